"""Top-k store size and fidelity: our shards vs the published layout (fp16 + int64 Arrow lists).

A random-weight Llama with the real Llama-2 vocabulary (32,000 ids) is run over real text; its
top-10 distributions go through `extract_topk` (our store) and through an Arrow table with one
list<int64> and one list<float16> column per position group, as the published scripts keep them.
Reports bytes per token for both, and the largest error on a top-k probability after our round
trip (against float64 log-softmax of the same forward pass).

    .venv/bin/python benchmarks/bench_store.py [--pieces 64] [--tokens 512]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from _common import emit, load_tokenizer, real_text
from pyarrow import feather

from fusellm.data.extract import extract_topk
from fusellm.data.store import open_topk
from fusellm.testing.tiny import tiny_model


def pieces_of(tokenizer, text: str, n: int, tokens: int) -> list[str]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    out, start = [], 0
    for i in range(tokens, len(spans), tokens):
        out.append(text[spans[start][0] : spans[i - 1][1]])
        start = i
        if len(out) == n:
            break
    return out


def published_bytes(store, folder: Path) -> int:
    """Bytes of the same top-k as the published Arrow layout (per position: int64 ids, fp16 values)."""
    ids, values = [], []
    for record in store:
        ids.extend(record.ids.tolist())
        values.extend(np.exp(record.logprobs).astype(np.float16).tolist())
    table = pa.table(
        {
            "ids": pa.array(ids, type=pa.list_(pa.int64())),
            "values": pa.array(values, type=pa.list_(pa.float16())),
        }
    )
    path = folder / "published.arrow"
    feather.write_feather(table, path, compression="uncompressed")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pieces", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    tokenizer = load_tokenizer("llama-spm")
    model = tiny_model("llama", tokenizer, seed=0, hidden=128, layers=2)
    with torch.no_grad():  # sharpen the random model so distributions look like a trained one's
        model.lm_head.weight.mul_(40)
    pieces = pieces_of(tokenizer, real_text(), args.pieces, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = extract_topk(model, tokenizer, pieces, folder / "ours", top_k=10, progress=False)
        store = open_topk(folder / "ours")
        worst = 0.0
        for i in range(0, len(pieces), max(1, len(pieces) // 8)):
            ids = tokenizer(pieces[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1).numpy()
            record = store[i]
            ok = record.ids >= 0
            exact = np.exp(np.take_along_axis(logp, np.where(ok, record.ids, 0), -1))
            worst = max(worst, float(np.abs(np.where(ok, np.exp(record.logprobs), 0) - np.where(ok, exact, 0)).max()))
        ours = manifest["bytes_per_token"]
        theirs = published_bytes(store, folder) / manifest["tokens"]
    print(f"tokens {manifest['tokens']}: ours {ours:.1f} B/token (with per-token CE), "
          f"published layout {theirs:.1f} B/token, ratio {theirs / ours:.2f}x; "
          f"max top-k probability error after round trip {worst:.4f}")
    emit({"bench": "store", "ours_bytes_per_token": round(ours, 2), "published_bytes_per_token": round(theirs, 2),
          "ratio": round(theirs / ours, 2), "max_prob_error": round(worst, 5), "tokens": manifest["tokens"]})


if __name__ == "__main__":
    main()
