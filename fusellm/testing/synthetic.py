"""Fused training data made up locally, for tests, benchmarks and smoke runs of the trainer.

Real fused data comes from the fusion stage; this builds a store of the same format whose
distributions are learnable (the true next token carries most of the mass, the rest is spread
over random ids), so a short run shows the loss going down without any source model.

`model_shaped_records` makes top-k records shaped like a real model's output instead, for what
depends on the shape of the data rather than on learning from it (the store's size and speed).
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


def model_shaped_records(
    n: int, vocab: int, *, k: int = 10, length: tuple[int, int] = (400, 600), seed: int = 0
) -> tuple[list[TopkRecord], list[np.ndarray]]:
    """`n` top-k records shaped like a real model's output (no model runs), and their exact
    float64 log-probs (the records hold them as float32).

    - ids follow a Zipf law (exponent 1) over the whole vocabulary, mostly in frequency order
      (low ids frequent, as in BPE vocabularies; each id's place is its frequency rank with
      log-normal noise), distinct within a row;
    - each position's distribution has Zipf-shaped logits with a random slope, and a confident
      top-1 at 30 % of the positions;
    - the next input token is drawn from that distribution (a calibrated model: top-1 is the next
      token ~57 % of the time, the top-`k` hold it ~77 % at k = 10), else it is a Zipf draw;
    - per-token CE is -log p(next token), float32, NaN at the last position; the record's CE is
      their mean.

    A record's length is drawn from [length[0], length[1]) (numpy's `integers`).
    """
    rng = np.random.default_rng(seed)
    ranks = np.arange(vocab)
    rank_to_id = np.argsort(np.log1p(ranks) + rng.normal(0, 0.5, vocab), kind="stable")
    cdf = np.cumsum(1.0 / (ranks + 1.0))
    cdf /= cdf[-1]

    def draw(shape):
        return rank_to_id[np.minimum(np.searchsorted(cdf, rng.random(shape)), vocab - 1)]

    records, truth = [], []
    for _ in range(n):
        size = int(rng.integers(*length))
        cand = draw((size, 4 * k))  # the first k distinct ids of each row
        order = np.argsort(cand, axis=1, kind="stable")
        ordered = np.take_along_axis(cand, order, 1)
        first = np.ones_like(ordered, dtype=bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        keep = np.zeros_like(first)
        np.put_along_axis(keep, order, first, 1)
        ids = np.take_along_axis(cand, np.argsort(~keep, axis=1, kind="stable")[:, :k], 1)
        slope = rng.uniform(0.3, 3.0, (size, 1))
        logits = -slope * np.log(np.arange(1, 257)) + rng.normal(0, 0.7, (size, 256))
        logits[:, 0] += np.where(rng.random(size) < 0.3, rng.uniform(3, 12, size), 0)
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        top = -np.sort(-logp, axis=1)[:, :k]
        rank = (rng.random(size)[:, None] >= np.cumsum(np.exp(top), 1)).sum(1)
        hit = rank < k
        at = np.minimum(rank, k - 1)
        nxt = np.where(hit, ids[np.arange(size), at], draw(size))
        input_ids = np.concatenate([draw(1), nxt[:-1]])
        miss = top[:, -1] + np.log(rng.uniform(1e-3, 1, size))
        token_ce = np.where(hit, -top[np.arange(size), at], -miss).astype(np.float32)
        token_ce[-1] = np.nan
        ce = float(np.mean(token_ce[:-1]))
        records.append(TopkRecord(input_ids, ids, top.astype(np.float32), ce, token_ce))
        truth.append(top)
    return records, truth
