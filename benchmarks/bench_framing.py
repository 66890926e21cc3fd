"""How much a model's document frame matters on real text (the table in docs/design.md §2.2).

For each real model (`fusellm.demo.real`), on real text of the three domains, the mean next-token
loss of the text's own tokens (nats per token, and bits per byte) when the piece is read:

- as extraction reads it (`fusellm.data.framing.document_frame`: BOS, else the document
  separator, before the text);
- with nothing before the text (`add_special_tokens=False`: what extraction did before);

and the loss of the piece's last prediction: the document separator the frame ends with, against
the tokenizer's EOS (a chat-turn marker for the instruct models).

    .venv/bin/python benchmarks/bench_framing.py
"""

from __future__ import annotations

import argparse
import math

import torch
from _common import emit

from fusellm.data.framing import document_frame
from fusellm.demo.data import load_split
from fusellm.demo.real import REAL_MODELS


def _losses(model, ids: list[int]) -> torch.Tensor:
    """-log p(ids[t+1] | ids[:t+1]) for every t, in nats."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].double()
    return -logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def measure(name: str, folder, texts: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    frame = document_frame(tok)
    framed = bare = 0.0
    tokens = n_bytes = 0
    end_sep = end_eos = 0.0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with_start = _losses(model, [frame.start, *ids, frame.end])
        framed += float(with_start[: len(ids)].sum())
        bare += float(_losses(model, ids).sum())  # the first token is not predicted here
        end_sep += float(with_start[-1])
        end_eos += float(_losses(model, [frame.start, *ids, tok.eos_token_id])[-1])
        tokens += len(ids)
        n_bytes += len(text.encode("utf-8"))
    n = len(texts)
    return {
        "model": name,
        "start": frame.start_token,
        "end": frame.end_token,
        "eos": tok.eos_token,
        "nats_per_token_framed": framed / tokens,
        "nats_per_token_bare": bare / (tokens - n),
        "bits_per_byte_framed": framed / math.log(2) / n_bytes,
        "end_nats_separator": end_sep / n,
        "end_nats_eos": end_eos / n,
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-domain", type=int, default=3, help="texts per domain")
    parser.add_argument("--chars", type=int, default=1200, help="characters per text, at most")
    args = parser.parse_args(argv)
    from fusellm.io.pretrained import ensure_model

    torch.manual_seed(0)
    texts = [
        t[: args.chars]
        for d in ("docs", "code", "docstrings")
        for t in load_split(d, "validation", max_bytes=40_000)[: args.per_domain]
    ]
    rows = [measure(short, ensure_model(name), texts) for short, name in REAL_MODELS.items()]
    print(
        "| model | start / end | nats/token, framed | nats/token, no start | bits/byte, framed "
        "| last prediction: separator | last prediction: EOS |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | `{r['start']}` / `{r['end']}` | {r['nats_per_token_framed']:.3f} | "
            f"{r['nats_per_token_bare']:.3f} | {r['bits_per_byte_framed']:.3f} | "
            f"{r['end_nats_separator']:.2f} | {r['end_nats_eos']:.2f} (`{r['eos']}`) |"
        )
    emit({"texts": len(texts), "rows": rows})


if __name__ == "__main__":
    main()
