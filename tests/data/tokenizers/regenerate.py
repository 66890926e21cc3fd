"""Regenerate the real test tokenizers (llama-spm, mpt, gpt-2) from llama.cpp's GGUF vocabularies.

Why: tests and benchmarks need real vocabularies (a SentencePiece one and two byte-level BPE ones)
but must run offline. The original model repositories are large and some are gated, while the
llama-cpp-python source distribution on PyPI ships small vocabulary-only GGUF files of exactly
these models (vendor/llama.cpp/models/ggml-vocab-*.gguf). This script turns them into the
`tokenizer.json` + `tokenizer_config.json` folders committed next to it.

* llama-spm, gpt-2: transformers converts GGUF tokenizers of these kinds itself.
* mpt (the GPT-NeoX vocabulary): transformers has no GGUF converter for it, so the byte-level BPE
  is built here from the GGUF's tokens and merges with the `tokenizers` library.

Run by hand (it needs the network for pip; the test suite never runs it):

    python tests/data/tokenizers/regenerate.py            # rewrite the folders next to this script
    python tests/data/tokenizers/regenerate.py --check    # regenerate elsewhere and compare

Requires pip, transformers, tokenizers and gguf (`pip install gguf`; tested with gguf 0.19,
transformers 5.24, tokenizers 0.23). `--sdist FILE` uses an already downloaded sdist instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gguf import GGUFReader
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent
NAMES = ("llama-spm", "mpt", "gpt-2")
SDIST = "llama-cpp-python==0.3.36"
MODELS = "vendor/llama.cpp/models"
MODEL_MAX_LENGTH = 4096


def extract_ggufs(sdist: Path | None, work: Path) -> dict[str, Path]:
    """Download the sdist (unless given) and extract ggml-vocab-<name>.gguf for each name."""
    if sdist is None:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, SDIST, "-d", str(work)], check=True)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    paths = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            for name in NAMES:
                if member.name.endswith(f"/{MODELS}/ggml-vocab-{name}.gguf"):
                    paths[name] = work / f"ggml-vocab-{name}.gguf"
                    paths[name].write_bytes(tar.extractfile(member).read())
    missing = set(NAMES) - set(paths)
    if missing:
        sys.exit(f"{sdist} lacks {MODELS}/ggml-vocab-*.gguf for {sorted(missing)}")
    return paths


def bytelevel_bpe(fields: dict):
    """A GPT-NeoX style byte-level BPE tokenizer from GGUF tokens and merges."""
    tokens = fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    tok.decoder = decoders.ByteLevel()
    eos = tokens[fields["tokenizer.ggml.eos_token_id"]]
    tok.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
    return tok


def convert(name: str, gguf_path: Path, out: Path) -> None:
    """Write out/tokenizer.json and a minimal out/tokenizer_config.json."""
    reader = GGUFReader(gguf_path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}
    if name == "mpt":
        backend = bytelevel_bpe(fields)
    else:
        backend = AutoTokenizer.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name
        ).backend_tokenizer
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    tokens = fields["tokenizer.ggml.tokens"]
    eos = tokens[fields["tokenizer.ggml.eos_token_id"]]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": tokens[fields["tokenizer.ggml.bos_token_id"]],
        "eos_token": eos,
        "unk_token": tokens[fields["tokenizer.ggml.unknown_token_id"]]
        if "tokenizer.ggml.unknown_token_id" in fields
        else eos,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def compare(new: Path, old: Path) -> list[str]:
    """What differs between a regenerated folder and the committed one (empty: the same)."""
    if all(
        (new / f).read_bytes() == (old / f).read_bytes()
        for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return []
    diffs = ["files are not byte-identical"]
    a, b = (json.loads((d / "tokenizer.json").read_text(encoding="utf-8")) for d in (new, old))
    va, vb = a["model"]["vocab"], b["model"]["vocab"]
    if va != vb:
        changed = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])
        diffs.append(
            f"vocab: {len(va)} vs {len(vb)} entries, {len(changed)} differ, e.g. {changed[:5]}"
        )
    ma, mb = (
        [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in x["model"]["merges"]]
        for x in (a, b)
    )
    if ma != mb:
        first = next((i for i, (x, y) in enumerate(zip(ma, mb)) if x != y), min(len(ma), len(mb)))
        diffs.append(f"merges: {len(ma)} vs {len(mb)}, first difference at {first}")
    if a["added_tokens"] != b["added_tokens"]:
        diffs.append(f"added_tokens: {a['added_tokens']} vs {b['added_tokens']}")
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if a[part] != b[part]:
            diffs.append(f"{part}: {json.dumps(a[part])} vs {json.dumps(b[part])}")
    rest = {
        k for k in a["model"] if k not in ("vocab", "merges") and a["model"][k] != b["model"].get(k)
    }
    if rest:
        diffs.append(f"model settings: {sorted(rest)}")
    ca, cb = (
        json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8")) for d in (new, old)
    )
    if ca != cb:
        diffs.append(f"tokenizer_config.json: {ca} vs {cb}")
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary folder and compare with the committed files",
    )
    parser.add_argument("--sdist", type=Path, help="a downloaded llama_cpp_python-0.3.36.tar.gz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ggufs = extract_ggufs(args.sdist, work)
        target = work / "out" if args.check else HERE
        failed = False
        for name in NAMES:
            convert(name, ggufs[name], target / name)
            if args.check:
                diffs = compare(target / name, HERE / name)
                failed |= bool(diffs)
                print(
                    f"{name}: "
                    + ("identical" if not diffs else "DIFFERENT\n  " + "\n  ".join(diffs))
                )
            else:
                print(f"wrote {target / name}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
