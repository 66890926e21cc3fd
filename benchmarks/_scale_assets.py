"""Inputs of the scaling benchmark: three tiny models, nested corpora, a fixed held-out set.

Everything is built from text that ships with Python (`fusellm.demo.data`), deterministically,
so two runs on one machine measure the same work. Models have random weights: the benchmark
measures throughput and memory, not quality, and random weights cost the same FLOPs.

The corpora are nested prefixes of one document stream (every non-held-out document of the
demo's three domains, in the order of a hash of its content), so the 4x and 16x corpora have
the same mix of prose, code and docstrings as the 1x one: only the amount changes.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusellm.demo.data import DOMAINS, leading_within, load_split, split_position

BLOCK_SIZE = 512
MARGIN = 8
TOP_K = 10  # the paper's
TRAIN_STEPS = 32  # enough work that a one-second hiccup does not decide the ratio
TRAIN_BATCH = 4
HELDOUT_DOCS = 8  # per bits-per-byte task: evaluation must cost the same at every size
HELDOUT_CHARS = 1500
HELDOUT_QUESTIONS = 4  # per domain, for the multiple-choice task

# name -> (architecture, tokenizer family, vocabulary size, which slice of text it learns from):
# the demo's three sources; GPT-2 learns its merges from other text than GPT-NeoX, so the two
# byte-level vocabularies cut text differently, as the real ones do.
MODELS = {
    "llama": ("llama", "spm", 1000, 0),
    "neox": ("gpt_neox", "bytelevel", 800, 0),
    "gpt2": ("gpt2", "bytelevel", 1200, 1),
}
TOKENIZER_BYTES = 1_000_000
# Small enough that extracting 3 x 8 MB of text takes minutes on 2 cores; the cost that matters
# at the paper's scale (a 7B forward pass) is projected from FLOPs, not from these models.
MODEL_SIZES = {"hidden": 16, "layers": 1, "heads": 2, "max_positions": BLOCK_SIZE}


def corpus_stream() -> list[str]:
    """Every train and fusion document of the three domains, in content-hash order."""
    docs = [d for dom in DOMAINS for split in ("train", "fusion") for d in load_split(dom, split)]
    return sorted(docs, key=split_position)


def corpus_prefix(docs: list[str], max_bytes: int) -> list[str]:
    """The leading documents of the stream that fit in `max_bytes` of UTF-8."""
    out = leading_within(docs, max_bytes)
    total = sum(len(doc.encode("utf-8")) for doc in out)
    if total < 0.95 * max_bytes:
        raise ValueError(
            f"only {total:,} bytes of text available for a {max_bytes:,}-byte corpus; "
            "use a smaller --base-bytes"
        )
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
    return path


def write_corpus(folder: Path, docs: list[str]) -> dict:
    """One JSONL file of documents; returns its size (documents, UTF-8 bytes)."""
    write_jsonl(folder / "docs.jsonl", [{"text": d} for d in docs])
    return {"documents": len(docs), "bytes": sum(len(d.encode("utf-8")) for d in docs)}


def tokenizer_text(slice_index: int) -> list[str]:
    """About `TOKENIZER_BYTES` of training-split text; slice 1 is disjoint from slice 0."""
    docs = sorted((d for dom in DOMAINS for d in load_split(dom, "train")), key=split_position)
    start = slice_index * TOKENIZER_BYTES
    out, seen = [], 0
    for doc in docs:
        size = len(doc.encode("utf-8"))
        if seen >= start:
            out.append(doc)
        seen += size
        if seen >= start + TOKENIZER_BYTES:
            break
    return out


def models_key() -> str:
    """Names the models folder after what builds them, so a changed recipe builds anew."""
    import hashlib

    import tokenizers
    import transformers

    recipe = [MODELS, MODEL_SIZES, TOKENIZER_BYTES, tokenizers.__version__, transformers.__version__]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12]


def build_models(folder: Path) -> dict[str, Path]:
    """The three tiny models (built once; a finished folder has its config.json)."""
    from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

    paths = {}
    for seed, (name, (arch, kind, vocab, text_slice)) in enumerate(MODELS.items()):
        path = folder / name
        if not (path / "config.json").is_file():
            tok = train_tokenizer(tokenizer_text(text_slice), kind=kind, vocab_size=vocab)
            save_tiny(tiny_model(arch, tok, seed=seed, **MODEL_SIZES), tok, path)
        paths[name] = path
    return paths


def write_eval_data(folder: Path) -> dict:
    """The `local` suite's data (layout of tests/data/eval/fusellm/local): held-out text only.

    A few short documents per domain and a few "which line follows?" questions, fixed by
    content hashes: evaluation is not what scales with the corpus, so it is kept small.
    """
    from fusellm.demo.run import continuation_questions

    root = folder / "fusellm" / "local"
    questions, counts = [], {}
    for domain in DOMAINS:
        docs = [d[:HELDOUT_CHARS] for d in load_split(domain, "heldout")[:HELDOUT_DOCS]]
        write_jsonl(root / domain / "test.jsonl", [{"text": d} for d in docs])
        counts[domain] = len(docs)
        questions += continuation_questions(load_split(domain, "heldout"), n=HELDOUT_QUESTIONS)
    write_jsonl(root / "mc" / "test.jsonl", questions)
    counts["mc"] = len(questions)
    return counts


def heldout_texts(folder: Path) -> list[str]:
    """Every text the evaluation scores (documents, and question + choice of each question)."""
    root = folder / "fusellm" / "local"
    texts = []
    for path in sorted(root.glob("*/test.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "text" in row:
                texts.append(row["text"])
            else:
                texts += [row["question"] + "\n" + c for c in row["choices"]]
    return texts


def fusion_config(models: dict[str, Path], corpus: Path, eval_dir: Path, workdir: Path,
                  *, shard_size: int, workers: int = 1) -> dict:
    """The whole fusion as data: target = Llama, all three as sources, a fixed training."""
    return {
        "name": "bench-scale",
        "target": {"uri": str(models["llama"]), "name": "llama"},
        "sources": [{"uri": str(p), "name": n} for n, p in models.items()],
        "corpus": {"uri": str(corpus)},
        "pieces": {"block_size": BLOCK_SIZE, "margin": MARGIN, "workers": workers},
        "extraction": {
            "top_k": TOP_K, "batch_size": 64, "shard_size": shard_size, "device": "cpu"
        },
        "fusion": {"workers": workers},
        "training": {
            "global_batch": TRAIN_BATCH,
            "micro_batch": TRAIN_BATCH,
            "max_length": BLOCK_SIZE,
            "max_steps": TRAIN_STEPS,
            "learning_rate": 1e-4,
            "zero_stage": 0,
            "bf16": False,
            "gradient_checkpointing": False,
            "checkpoint_every": TRAIN_STEPS,
            "keep_checkpoints": 1,
        },
        "evaluation": {"suites": ["local"], "data_dir": str(eval_dir), "batch_size": 8},
        "tracking": {"register_model": False},
        "workdir": str(workdir),
    }
