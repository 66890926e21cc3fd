"""Extraction throughput: top-k on the device vs copying full logits to the host.

Ours is `fusellm.data.extract.extract_topk` (top-k and log-softmax on the device, only [B, L, k] values
cross to the host, shards written to disk). The baseline runs the same forward passes and copies
the full [B, L, V] logits to the host, where it takes the log-softmax and top-k (what a plain
loop does). Default: a 1B-class random-weight Llama (TinyLlama shape) in bf16 on CUDA, pieces of
2048 tokens of real text; `--size tiny` runs a small model on the CPU.

    .venv/bin/python benchmarks/bench_extract.py [--size 1b|tiny] [--pieces 16] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from _common import emit, load_tokenizer, real_text
from transformers import AutoModelForCausalLM, LlamaConfig

from fusellm.data.extract import _encode, extract_topk
from fusellm.data.framing import document_frame

SIZES = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
}


def pieces_of(tokenizer, text: str, n: int, tokens: int) -> list[str]:
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for i in range(0, len(spans) - tokens, tokens):
        out.append(text[spans[i][0] : spans[i + tokens - 1][1]])
        if len(out) == n:
            return out
    raise SystemExit(f"not enough text for {n} pieces of {tokens} tokens")


@torch.inference_mode()
def host_topk_loop(model, batches, top_k: int, device) -> None:
    """Baseline: full logits to the host, log-softmax and top-k there."""
    for batch in batches:
        width = max(len(ids) for ids in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        host = logits.float().cpu()
        logp = torch.log_softmax(host, dim=-1)
        logp.topk(top_k, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--pieces", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2047, help="text tokens per piece (EOS makes 2048)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer("llama-spm")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SIZES[args.size])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    pieces = pieces_of(tokenizer, real_text(2_000_000), args.pieces, args.tokens)
    encoded = _encode(pieces, tokenizer, args.tokens + 2, document_frame(tokenizer))
    tokens = sum(len(ids) for ids in encoded)
    batches = [encoded[i : i + args.batch_size] for i in range(0, len(encoded), args.batch_size)]

    host_topk_loop(model, batches[:1], args.top_k, device)  # warm-up (kernels, allocator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    host_topk_loop(model, batches, args.top_k, device)
    sync()
    baseline = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract_topk(model, tokenizer, pieces, tmp, top_k=args.top_k, batch_size=args.batch_size,
                     max_length=args.tokens + 2, progress=False)
        sync()
        ours = time.perf_counter() - start
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{card}: {params / 1e9:.2f}B params, {dtype}, {len(pieces)} x {args.tokens + 1} tokens, batch {args.batch_size}")
    print(f"ours (top-k on device, store written): {tokens / ours:,.0f} tokens/s")
    print(f"baseline (full logits to host):        {tokens / baseline:,.0f} tokens/s")
    emit({"bench": "extract", "device": card, "params": params, "dtype": str(dtype), "tokens": tokens,
          "ours_tokens_per_s": round(tokens / ours, 1), "baseline_tokens_per_s": round(tokens / baseline, 1),
          "speedup": round(baseline / ours, 2)})


if __name__ == "__main__":
    main()
