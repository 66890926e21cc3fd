"""Projected wall time of each stage for the paper's corpus, from the measured rates.

MiniPile (the paper's fusion corpus): ~1M documents, ~1.8B target (Llama-2) tokens; three 7B
models (Llama-2 as target and source, OpenLLaMA, MPT), top-10, block 2048. The machine: 64 CPU
cores and 8 H100 GPUs. GPU stages are projected from FLOPs, CPU stages from the rate measured
per core-second here, each with the assumptions written next to it (`ASSUMPTIONS`), so a reader
can redo the arithmetic; docs/scaling.md does so.
"""

from __future__ import annotations

MINIPILE = {
    "documents": 1_000_000,
    "tokens": 1.8e9,  # target (Llama-2) tokens
    "bytes_per_token": 4.0,  # Llama-2 on English web text: ~4 bytes a token -> ~7.2 GB
    "models": 3,
    "params": 7e9,
    "top_k": 10,
    "block": 2048,
    "pieces": 1.2e6,  # documents, plus the cuts of those longer than a block
    "shard_size": 256,  # extraction.shard_size, the default
    "weights_bytes": 13.5e9,  # 7B in bf16
}
MACHINE = {
    "cores": 64,
    "gpus": 8,
    "gpu": "H100 SXM",
    "peak_flops": 989e12,  # dense bf16
    "mfu": 0.40,
    "load_bytes_per_s": 2e9,  # weights from local NVMe into GPU memory
}
ASSUMPTIONS = [
    "MiniPile: 1.8e9 target tokens, 4 bytes per token (7.2 GB of text), 1M documents",
    "3 models of 7e9 parameters, each reading ~1.8e9 tokens of its own tokenizer",
    (
        "GPU stages: 8 x H100 at 40 % MFU of 989 TFLOP/s bf16; forward 2*P*tokens, "
        "training 6*P*tokens (fused and CLM baseline each train one epoch)"
    ),
    (
        "extraction: the 8 GPUs shared out among the 3 models (3, 3 and 2), each GPU loading "
        "its model once (13.5 GB of bf16 weights at 2 GB/s, all GPUs at once) and running its "
        "shards one after the other"
    ),
    (
        "CPU stages: the rate measured per CPU-second on this machine, times the cores in use; "
        "a server core is taken as fast as one core here"
    ),
    (
        "align-and-fuse: per target token and per byte of text; the slower of the two is used "
        "(the tiny tokenizers here cut ~2 bytes a token, Llama-2 ~4)"
    ),
    (
        "vocabulary maps: measured on the real Llama-2, MPT and GPT-2 tokenizers "
        "(tests/data/tokenizers), one map per source, one after the other"
    ),
    (
        "pieces and align-and-fuse: cut and fused in one process per core (pieces.workers, "
        "fusion.workers default to the cores), at the rate measured here per CPU-second; the "
        "speedups measured here with 2 workers over 1 say how close to linear that is"
    ),
    "evaluation does not depend on the corpus and is not projected",
]


def gpu_seconds(flops: float, machine: dict = MACHINE) -> float:
    return flops / (machine["gpus"] * machine["mfu"] * machine["peak_flops"])


def cpu_seconds(work: float, per_core_rate: float, cores: float) -> float:
    """Seconds for `work` (tokens or bytes) at `per_core_rate` per CPU-second on `cores`."""
    return work / (per_core_rate * cores)


def project(rates: dict, machine: dict = MACHINE, corpus: dict = MINIPILE) -> dict:
    """Seconds per stage at the paper's scale, with the arithmetic's inputs.

    `rates`: pieces_bytes_per_cpu_s, fuse_tokens_per_cpu_s, fuse_bytes_per_cpu_s,
    vocab_map_seconds (list, real tokenizers).
    """
    tokens, cores = corpus["tokens"], machine["cores"]
    text_bytes = tokens * corpus["bytes_per_token"]
    pieces = cpu_seconds(text_bytes, rates["pieces_bytes_per_cpu_s"], cores)
    fuse_by_tokens = cpu_seconds(tokens, rates["fuse_tokens_per_cpu_s"], cores)
    fuse_by_bytes = cpu_seconds(text_bytes, rates["fuse_bytes_per_cpu_s"], cores)
    fuse = max(fuse_by_tokens, fuse_by_bytes)
    vocab = sum(rates["vocab_map_seconds"])
    extract = gpu_seconds(2 * corpus["params"] * tokens * corpus["models"], machine)
    loads = corpus["weights_bytes"] / machine["load_bytes_per_s"]  # once per GPU, in parallel
    train_one = gpu_seconds(6 * corpus["params"] * tokens, machine)
    stages = {
        "pieces": pieces,
        "extract": extract,
        "extract_model_loads": loads,
        "vocab": vocab,
        "align_fuse": fuse,
        "align_fuse_by_tokens": fuse_by_tokens,
        "align_fuse_by_bytes": fuse_by_bytes,
        "train": 2 * train_one,
        "evaluate": None,
    }
    cpu_total = stages["pieces"] + vocab + fuse
    return {
        "seconds": {k: (None if v is None else round(v, 1)) for k, v in stages.items()},
        "pieces_vocab_align_fuse_hours": round(cpu_total / 3600, 2),
        "inputs": {
            "text_bytes": text_bytes,
            "tokens": tokens,
            "cores": cores,
            "gpu_flops_per_s": machine["gpus"] * machine["mfu"] * machine["peak_flops"],
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in rates.items()},
        },
        "machine": machine,
        "corpus": corpus,
        "assumptions": ASSUMPTIONS,
    }


def vocab_map_seconds(tokenizers_dir) -> list[float]:
    """Time one map per source into the real Llama-2 tokenizer (the paper's three sources:
    Llama-2 itself, MPT, and GPT-2's vocabulary standing in for OpenLLaMA's)."""
    import time

    from transformers import AutoTokenizer

    from fusellm.method.vocab import build_vocab_map

    target = AutoTokenizer.from_pretrained(str(tokenizers_dir / "llama-spm"))
    out = []
    for name in ("llama-spm", "mpt", "gpt-2"):
        source = AutoTokenizer.from_pretrained(str(tokenizers_dir / name))
        started = time.perf_counter()
        build_vocab_map(source, target, method="prefix", progress=False)
        out.append(time.perf_counter() - started)
    return out
