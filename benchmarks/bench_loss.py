"""Sparse fusion loss vs a dense-target implementation: time and peak memory (forward + backward).

Shape as in the issue: B = 2, L = 1024, V = 32000, k = 10. The dense baseline builds the fused
target as a [B, L, V] tensor (what the published collator does) and takes -sum(target * log_softmax).
Each variant runs in its own process so that peak memory (ru_maxrss on CPU, max_memory_allocated
on CUDA) is its own; the peak is reported above the inputs already in memory.

    .venv/bin/python benchmarks/bench_loss.py [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch
from _common import emit

B, L, V, K = 2, 1024, 32000, 10


def inputs(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, V, generator=g).to(device)
    labels = torch.randint(0, V, (B, L), generator=g).to(device)
    ids = torch.randint(0, V, (B, L, K), generator=g).to(device)
    logprobs = torch.log_softmax(torch.randn(B, L, K, generator=g), -1).to(device)
    return logits, labels, ids, logprobs


def dense_loss(logits, labels, ids, logprobs, lam=0.9, temperature=1.0):
    logits, next_labels, ids, logprobs = logits[:, :-1], labels[:, 1:], ids[:, :-1], logprobs[:, :-1]
    keep = next_labels != -100
    logp = torch.log_softmax(logits.float(), -1)
    clm = -logp.gather(-1, next_labels[..., None]).squeeze(-1)[keep].mean()
    target = torch.zeros_like(logp).scatter_add_(-1, ids, torch.softmax(logprobs / temperature, -1))
    fuse = -(target * logp).sum(-1)[keep].mean()
    return lam * clm + (1 - lam) * fuse


def sparse_loss(logits, labels, ids, logprobs):
    from fusellm.method.loss import fusion_loss

    return fusion_loss(logits, labels, ids, logprobs, lam=0.9, temperature=1.0)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(name: str, device: str, repeats: int, queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    fn = {"sparse": sparse_loss, "dense": dense_loss}[name]
    logits, labels, ids, logprobs = inputs(device)
    logits.requires_grad_(True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times, value = [], None
    for _ in range(repeats):
        logits.grad = None
        start = time.perf_counter()
        loss = fn(logits, labels, ids, logprobs)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        value = loss.item()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes()) - base
    queue.put({"name": name, "seconds": statistics.median(times), "peak_bytes": peak, "loss": value})


def measure(name: str, device: str, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_variant, args=(name, device, repeats, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ours = measure("sparse", args.device, args.repeats)
    dense = measure("dense", args.device, args.repeats)
    assert abs(ours["loss"] - dense["loss"]) < 1e-3, (ours["loss"], dense["loss"])
    for r in (ours, dense):
        print(f"{r['name']:>6}: {r['seconds'] * 1e3:8.1f} ms/step  peak +{r['peak_bytes'] / 2**20:8.1f} MiB  loss {r['loss']:.5f}")
    emit({
        "bench": "loss", "device": args.device, "shape": [B, L, V, K],
        "ours_ms": round(ours["seconds"] * 1e3, 1), "dense_ms": round(dense["seconds"] * 1e3, 1),
        "speedup": round(dense["seconds"] / ours["seconds"], 2),
        "ours_peak_mib": round(ours["peak_bytes"] / 2**20, 1), "dense_peak_mib": round(dense["peak_bytes"] / 2**20, 1),
        "memory_ratio": round(dense["peak_bytes"] / max(ours["peak_bytes"], 1), 2),
    })


if __name__ == "__main__":
    main()
