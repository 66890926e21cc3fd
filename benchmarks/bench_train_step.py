"""Step time and peak memory of a fusion training step vs a plain CLM step.

Both run through the trainer's own path (`fusellm.train.engine.build_engine` + `micro_step`, a
DeepSpeed ZeRO-2 engine) on the same model and the same batch; the only difference is lambda
(0.9 with the fused top-k vs 1.0 without), so the ratio is the price of the fusion objective.
Steps alternate between the two modes so that load on a shared machine hits both alike.

    python benchmarks/bench_train_step.py                              # tiny Llama on CPU
    python benchmarks/bench_train_step.py --device cuda --size 1b      # 1B-class, bf16, 2048 tokens

The last line printed is JSON: per-mode median step time, tokens/s, peak memory (CUDA: max
allocated; CPU: peak of live tensor bytes seen by the torch profiler), MFU on CUDA, the
objective's own time (`loss_only_s`: loss forward + backward on fixed logits), and
`ratio` = fusion / CLM median step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fusellm.method.loss import fusion_loss_parts
from fusellm.testing.synthetic import synthetic_records
from fusellm.train.collator import collate
from fusellm.train.config import TrainConfig
from fusellm.train.engine import build_engine, init_distributed, micro_step

# Llama-shaped sizes; "1b" is TinyLlama-1.1B's shape with Llama-2's 32k vocabulary.
SIZES = {
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
# Dense bf16 peak of the GPU, for MFU; override with --peak-tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def make_batch(vocab: int, batch: int, length: int, top_k: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    records = synthetic_records(ids.tolist(), vocab, top_k=top_k, seed=seed)
    return collate(records, pad_id=0, max_length=length)


def flops_per_token(cfg: LlamaConfig, length: int) -> float:
    """6 N (weights, forward + backward) plus attention scores, as in the PaLM MFU formula."""
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    weights = layers * per_layer + h * cfg.vocab_size  # the lm head; embeddings are lookups
    return 6 * weights + 12 * layers * h * length


def peak_tflops(device: str, override: float | None) -> float | None:
    if override or device != "cuda":
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def cpu_peak_bytes(engine, batch, config) -> int:
    """Peak of the running sum of live tensor bytes over one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        micro_step(engine, batch, config)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def timed_loss(logits: torch.Tensor, batch: dict, config, device: str) -> float:
    """The objective alone, forward and backward, on fixed logits: its own share of a step."""
    x = logits.detach().requires_grad_()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    total = fusion_loss_parts(
        x,
        batch["labels"],
        batch.get("topk_ids"),
        batch.get("topk_logprobs"),
        lam=config.lam,
        temperature=config.temperature,
    )[0]
    total.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed_step(engine, batch, config, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    micro_step(engine, batch, config)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="tiny on CPU, 1b on CUDA"
    )
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU on CUDA")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    size = args.size or ("1b" if args.device == "cuda" else "tiny")
    batch_size = args.batch or (1 if size == "1b" else 2)
    length = args.length or (2048 if size == "1b" else 256)

    init_distributed()
    cfg = LlamaConfig(max_position_embeddings=max(length, 2048), **SIZES[size])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # DeepSpeed's default gradient bucket (5e8 elements, 2 GB) is allocated every step; sized
    # to the model it stops dominating the peak of a small one. Time is the same either way.
    bucket = min(sum(p.numel() for p in model.parameters()), 500_000_000)
    common = {
        "global_batch": batch_size,
        "micro_batch": batch_size,
        "zero_stage": 2,
        "learning_rate": 1e-5,
        "warmup_ratio": 0.0,
        "gradient_checkpointing": False,
        "bf16": args.device == "cuda",
        "deepspeed": {
            "zero_optimization": {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        },
    }
    modes = {"fusion": TrainConfig(lam=0.9, **common), "clm": TrainConfig(lam=1.0, **common)}
    engine = build_engine(modes["fusion"], model, total_steps=10**6, world_size=1)
    batch = make_batch(cfg.vocab_size, batch_size, length, args.top_k, seed=0)
    inputs = {
        "fusion": batch,
        "clm": {k: v for k, v in batch.items() if not k.startswith("topk")},
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.warmup + args.steps):
        for mode in modes if i % 2 == 0 else reversed(list(modes)):
            elapsed = timed_step(engine, inputs[mode], modes[mode], args.device)
            if i >= args.warmup:
                times[mode].append(elapsed)

    on_device = {k: v.to(engine.device) for k, v in batch.items()}
    with torch.no_grad():
        logits = engine(
            input_ids=on_device["input_ids"], attention_mask=on_device["attention_mask"]
        ).logits
    loss_times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.warmup + args.steps):
        for mode, config in modes.items():
            part = (
                on_device
                if mode == "fusion"
                else {k: v for k, v in on_device.items() if not k.startswith("topk")}
            )
            elapsed = timed_loss(logits, part, config, args.device)
            if i >= args.warmup:
                loss_times[mode].append(elapsed)
    del logits

    tokens = int(batch["attention_mask"].sum())
    peak = peak_tflops(args.device, args.peak_tflops)
    report: dict = {
        "device": args.device,
        "size": size,
        "batch": batch_size,
        "length": length,
        "top_k": args.top_k,
        "params": sum(p.numel() for p in model.parameters()),
    }
    for mode, config in modes.items():
        median = statistics.median(times[mode])
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            micro_step(engine, inputs[mode], config)
            memory = torch.cuda.max_memory_allocated()
        else:
            memory = cpu_peak_bytes(engine, inputs[mode], config)
        tps = tokens / median
        report[mode] = {
            "step_s": round(median, 5),
            "min_step_s": round(min(times[mode]), 5),  # the least disturbed by other load
            "loss_only_s": round(statistics.median(loss_times[mode]), 5),
            "tokens_per_s": round(tps, 1),
            "peak_memory_mb": round(memory / 2**20, 1),
            "mfu": round(tps * flops_per_token(cfg, length) / (peak * 1e12), 4) if peak else None,
        }
        print(
            f"{mode:>6}: {median * 1e3:8.1f} ms/step  {tps:10.1f} tokens/s  "
            f"{memory / 2**20:8.1f} MiB peak"
        )
    report["ratio"] = round(report["fusion"]["step_s"] / report["clm"]["step_s"], 4)
    report["loss_only_ratio"] = round(
        report["fusion"]["loss_only_s"] / report["clm"]["loss_only_s"], 4
    )
    report["memory_ratio"] = round(
        report["fusion"]["peak_memory_mb"] / max(report["clm"]["peak_memory_mb"], 1e-9), 4
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
