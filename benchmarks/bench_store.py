"""Top-k store size, speed and fidelity at k = 10 for three vocabulary sizes.

The data are SYNTHETIC, shaped like a real model's output (no model runs here;
fusellm.testing.synthetic.model_shaped_records makes them):
- ids follow a Zipf law (exponent 1) over the whole vocabulary, mostly in frequency order (low
  ids frequent, as in BPE vocabularies; each id's place is its frequency rank with log-normal
  noise), distinct within a row;
- each position's distribution has Zipf-shaped logits with a random slope, and a confident top-1
  at 30 % of the positions;
- the next input token is drawn from that distribution (a calibrated model: top-1 is the next
  token ~57 % of the time, the top-10 hold it ~77 %), else it is a Zipf draw;
- per-token CE is -log p(next token), float32, NaN at the last position.

Reports bytes per token per model (per-token CE included) for 49,152, 151,936 and 262,144 ids,
beside what format version 1 (plain arrays: uint16 ids up to 65,536 entries, uint32 above)
and the published layout (Arrow lists of int64 ids and fp16 values) take for the same records;
the largest error on a probability after the round trip (against float64 truth); whether ids,
codes and the float16 per-token CE came back exactly; write and read times (one shard, 2 runs,
the faster), version 1's beside them (its arrays written and read as it did).

    .venv/bin/python benchmarks/bench_store.py [--pieces 64] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from _common import emit, max_prob_error
from pyarrow import feather
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fusellm.data import store as topk_store
from fusellm.data.store import TopkRecord, encode_logprobs, open_topk, write_topk
from fusellm.testing.synthetic import model_shaped_records

VOCABS = (49_152, 151_936, 262_144)
TOP_K = 10


def published_bytes(records: list[TopkRecord], truth: list[np.ndarray], folder: Path) -> int:
    """The same top-k in the published Arrow layout (per position: int64 ids, fp16 values)."""
    ids = [row for r in records for row in r.ids.tolist()]
    values = [row for t in truth for row in np.exp(t).astype(np.float16).tolist()]
    table = pa.table(
        {
            "ids": pa.array(ids, type=pa.list_(pa.int64())),
            "values": pa.array(values, type=pa.list_(pa.float16())),
        }
    )
    path = folder / "published.arrow"
    feather.write_feather(table, path, compression="uncompressed")
    return path.stat().st_size


def best_of(fn, repeats: int = 2) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(vocab: int, pieces: int, tokens: int, folder: Path) -> dict:
    length = (tokens // 2, tokens + 1)
    records, truth = model_shaped_records(pieces, vocab, k=TOP_K, length=length, seed=vocab)
    n_tokens = sum(len(r) for r in records)
    shard_size = len(records)

    def write():
        out = folder / f"v2-{vocab}-{time.perf_counter_ns()}"
        manifest = write_topk(
            out, records, top_k=TOP_K, vocab_size=vocab, meta={}, shard_size=shard_size
        )
        return manifest, out

    write_s, (manifest, out) = best_of(write)
    read_s, back = best_of(lambda: list(open_topk(out)))

    def write_v1():  # version 1: the plain arrays in a safetensors file, hashed
        data = save_safetensors(topk_store._shard_arrays(records, TOP_K, vocab))
        (folder / f"v1-{vocab}.safetensors").write_bytes(data)
        hashlib.sha256(data).hexdigest()
        return len(data)

    def read_v1():
        data = (folder / f"v1-{vocab}.safetensors").read_bytes()
        hashlib.sha256(data).hexdigest()
        arrays = load_safetensors(data)
        offsets = arrays["offsets"]
        for a, b in itertools.pairwise(offsets):
            codes = arrays["topk_codes"][a:b]
            np.where(codes == 0, -1, arrays["topk_ids"][a:b].astype(np.int64))
            topk_store.decode_logprobs(codes)
            arrays["token_ce"][a:b].astype(np.float32)

    write_v1_s, v1_bytes = best_of(write_v1)
    read_v1_s, _ = best_of(read_v1)
    exact = True
    for original, got in zip(records, back):
        codes = encode_logprobs(original.logprobs)
        exact &= bool(np.array_equal(got.input_ids, original.input_ids))
        exact &= bool(np.array_equal(got.ids, np.where(codes == 0, -1, original.ids)))
        exact &= bool(np.array_equal(encode_logprobs(got.logprobs), codes))
        exact &= bool(
            np.array_equal(
                got.token_ce.astype(np.float16).view(np.uint16),
                original.token_ce.astype(np.float16).view(np.uint16),
            )
        )
    worst = max_prob_error(back, truth)
    mb = n_tokens * TOP_K * 1e-6  # millions of top-k entries
    return {
        "vocab": vocab,
        "tokens": n_tokens,
        "bytes_per_token": round(manifest["bytes_per_token"], 2),
        "v1_bytes_per_token": round(v1_bytes / n_tokens, 2),
        "published_bytes_per_token": round(published_bytes(records, truth, folder) / n_tokens, 2),
        "max_prob_error": round(worst, 5),
        "lossless": exact,
        "write_s": round(write_s, 3),
        "read_s": round(read_s, 3),
        "v1_write_s": round(write_v1_s, 3),
        "v1_read_s": round(read_v1_s, 3),
        "write_mentries_per_s": round(mb / write_s, 1),
        "read_mentries_per_s": round(mb / read_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pieces", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048, help="most tokens a piece has")
    args = parser.parse_args()
    print(
        f"SYNTHETIC data shaped like a real model's output (Zipf ids, top-1 = next token often; "
        f"see the docstring), k = {TOP_K}, per-token CE stored, {args.pieces} pieces of "
        f"{args.tokens // 2}-{args.tokens} tokens per vocabulary, one shard"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in VOCABS:
            r = measure(vocab, args.pieces, args.tokens, Path(tmp))
            results.append(r)
            print(
                f"vocab {vocab:>7,}: {r['bytes_per_token']:5.2f} B/token/model "
                f"(format 1: {r['v1_bytes_per_token']:.2f}, published layout: "
                f"{r['published_bytes_per_token']:.2f}); max probability error "
                f"{r['max_prob_error']:.4f}, ids/codes/token CE exact: {r['lossless']}; "
                f"write {r['write_s']:.3f} s (format 1: {r['v1_write_s']:.3f}), read "
                f"{r['read_s']:.3f} s (format 1: {r['v1_read_s']:.3f}) for {r['tokens']:,} tokens"
            )
    emit({"bench": "store", "synthetic": True, "top_k": TOP_K, "results": results})


if __name__ == "__main__":
    main()
