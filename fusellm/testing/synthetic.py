"""Fused training data made up locally, for tests, benchmarks and smoke runs of the trainer.

Real fused data comes from the fusion stage; this builds a store of the same format whose
distributions are learnable (the true next token carries most of the mass, the rest is spread
over random ids), so a short run shows the loss going down without any source model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fusellm.data.store import TopkRecord, write_topk
from fusellm.io.fingerprint import tokenizer_fingerprint


def synthetic_records(
    token_ids: Iterable[list[int]], vocab_size: int, *, top_k: int = 4, seed: int = 0
) -> list[TopkRecord]:
    """One record per id sequence; slot 0 of row t is the token at t + 1 (p ~ 0.6)."""
    rng = np.random.default_rng(seed)
    records = []
    for ids in token_ids:
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        topk = rng.integers(0, vocab_size, size=(n, top_k))
        topk[:-1, 0] = ids[1:]
        scores = rng.normal(size=(n, top_k))
        scores[:, 0] += 3.0
        logprobs = scores - np.log(np.exp(scores).sum(-1, keepdims=True)) - 0.05
        records.append(
            TopkRecord(ids, topk, logprobs.astype(np.float32), ce=float(rng.uniform(1, 3)))
        )
    return records


def synthetic_store(
    out_dir, tokenizer, texts: Iterable[str], *, top_k: int = 4, seed: int = 0, sources=("a", "b")
) -> Path:
    """Write a fused store for `texts` in `tokenizer`'s vocabulary (EOS appended per piece)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = [tokenizer(t, add_special_tokens=False)["input_ids"] + eos for t in texts]
    records = synthetic_records(pieces, len(tokenizer), top_k=top_k, seed=seed)
    meta = {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "sources": list(sources),
        "corpus": "synthetic",
    }
    write_topk(out_dir, records, top_k=top_k, vocab_size=len(tokenizer), meta=meta)
    return Path(out_dir)
