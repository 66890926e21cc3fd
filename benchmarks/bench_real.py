"""Extraction, training step and store on the three real pretrained models, each against a
baseline measured in the same process.

Models: SmolLM2-135M-Instruct (49,152 ids, the target), Gemma-3-270M (262,144) and
Qwen2.5-Coder-0.5B-Instruct (151,936, untied head), from the cache (`fusellm models fetch`),
float32 on the CPU (or CUDA where visible). Text: the demo's fusion split of the three domains
(language reference, standard-library code, its docstrings), cut by `cut_pieces` for all three
tokenizers at once, so every model reads the same characters; the longest pieces, taken in
turn from the domains.

1. Extraction tokens/s: `extract_topk` (top-10, per-token CE, its store written to a temporary
   folder, fingerprints and hashes included) vs a plain loop over the same framed ids in the
   same batches (longest first, zero padding, attention mask): `model(...)`, `log_softmax`,
   `topk`. The two alternate (ours, baseline, baseline, ours, ...); `ratio` = ours / baseline
   tokens/s from the best run of each, `median_ratio` the median over rounds of the two runs
   of one round. Goal >= 0.95.
2. Training step of SmolLM2 (forward, backward, AdamW step) on one batch of real pieces: the
   trainer's loss (`fusion_loss_parts`, lambda 0.9, the top-10 SmolLM2's extraction stored for
   those pieces as the fused targets, `collate` as the trainer batches them) vs plain CLM
   cross-entropy (`F.cross_entropy` on shifted logits). Steps alternate; `ratio` = fused / CLM
   median step time. Goal <= 1.10.
3. Store: bytes per token per model at k = 10 from each extraction's manifest (goal <= 25),
   and the largest error of a probability after the round trip (codes read back from the
   store vs the float values of the baseline's pass over the same batches), as
   benchmarks/bench_store.py measures it.

    .venv/bin/python benchmarks/bench_real.py [--pieces 8] [--block-size 256] [--batch-size 4]
        [--repeats 3] [--steps 4] [--threads N] [--models smollm2-135m-instruct,...]

On a machine whose cores other work keeps busy, `--threads 1` is much faster than torch's
default (its threads wait for each other at every operation) and less noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import emit, max_prob_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusellm.data.extract import extract_topk
from fusellm.data.framing import document_frame
from fusellm.data.pieces import cut_pieces
from fusellm.data.store import open_topk
from fusellm.demo.data import DOMAINS, load_split
from fusellm.io.fingerprint import model_fingerprint, tokenizer_fingerprint
from fusellm.io.pretrained import ensure_model
from fusellm.method.loss import IGNORE_INDEX, fusion_loss_parts
from fusellm.train.collator import collate

TARGET = "smollm2-135m-instruct"
MODELS = (TARGET, "gemma-3-270m", "qwen2.5-coder-0.5b-instruct")
TOP_K = 10
LAM = 0.9
BYTES_GOAL, EXTRACT_GOAL, STEP_GOAL = 25.0, 0.95, 1.10


def load(name: str, device: torch.device):
    folder = ensure_model(name, progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def real_pieces(tokenizers, n: int, block_size: int, margin: int, max_bytes: int) -> list[str]:
    """The `n` longest pieces (target tokens) of the fusion split, in turn from each domain."""
    per_domain = []
    for domain in DOMAINS:
        docs = load_split(domain, "fusion", max_bytes=max_bytes)
        pieces = cut_pieces(docs, tokenizers, block_size, margin, progress=False)
        size = [len(tokenizers[0](p, add_special_tokens=False)["input_ids"]) for p in pieces]
        order = sorted(range(len(pieces)), key=lambda i: (-size[i], i))
        per_domain.append([pieces[i] for i in order])
    out = [p for group in zip(*per_domain) for p in group][:n]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} pieces; raise --max-bytes")
    return out


def framed_batches(tokenizer, texts: list[str], batch_size: int):
    """Framed ids in extraction's batches (longest first) with their pieces' indices."""
    frame = document_frame(tokenizer)
    encoded = [frame.wrap(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    return [
        [(i, encoded[i]) for i in order[b : b + batch_size]]
        for b in range(0, len(order), batch_size)
    ]


@torch.inference_mode()
def plain_topk_loop(model, tokenizer, texts, batch_size: int, device) -> list:
    """Baseline: tokenize, pad as extraction does, forward, log_softmax, topk; per piece
    (ids, float log-probs) on the host."""
    out: list = [None] * len(texts)
    for batch in framed_batches(tokenizer, texts, batch_size):
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (_, ids) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        values, indices = torch.log_softmax(logits, dim=-1).topk(TOP_K, dim=-1)
        values, indices = values.cpu().numpy(), indices.cpu().numpy()
        for row, (i, ids) in enumerate(batch):
            out[i] = (indices[row, : len(ids)], values[row, : len(ids)])
    return out


def timed(sync, fn, *args, **kwargs) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    sync()
    return time.perf_counter() - start, result


def bench_extraction(name, texts, args, device, sync, folder: Path) -> tuple[dict, list]:
    model, tokenizer = load(name, device)
    tokens = sum(len(ids) for batch in framed_batches(tokenizer, texts, 1) for _, ids in batch)
    # Part of every extraction (its store's meta), timed alone: a cost the loop does not pay.
    fingerprints_s = {
        "model": timed(sync, model_fingerprint, model)[0],
        "tokenizer": timed(sync, tokenizer_fingerprint, tokenizer)[0],
    }
    plain_topk_loop(model, tokenizer, texts[: args.batch_size], args.batch_size, device)  # warm-up
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    floats = manifest = store_dir = None
    for r in range(args.repeats):
        for mode in ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours"):
            if mode == "ours":
                store_dir = folder / f"{name}-{r}"  # a fresh folder: an old one would resume
                elapsed, manifest = timed(
                    sync,
                    extract_topk,
                    model,
                    tokenizer,
                    texts,
                    store_dir,
                    top_k=TOP_K,
                    batch_size=args.batch_size,
                    max_length=args.block_size,
                    progress=False,
                )
            else:
                elapsed, floats = timed(
                    sync, plain_topk_loop, model, tokenizer, texts, args.batch_size, device
                )
            times[mode].append(elapsed)
    records = list(open_topk(store_dir))
    assert manifest["tokens"] == tokens == sum(len(r) for r in records)
    truth = [lp.astype(np.float64) for _, lp in floats]
    kept = np.concatenate([(r.ids >= 0).ravel() for r in records])
    same = np.concatenate([(r.ids == ids).ravel() for r, (ids, _) in zip(records, floats)])
    best = {m: min(t) for m, t in times.items()}
    result = {
        "model": name,
        "vocab": int(manifest["vocab_size"]),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": tokens,
        "ours_tokens_per_s": round(tokens / best["ours"], 1),
        "baseline_tokens_per_s": round(tokens / best["baseline"], 1),
        "ours_s": [round(t, 3) for t in times["ours"]],
        "baseline_s": [round(t, 3) for t in times["baseline"]],
        "ratio": round(best["baseline"] / best["ours"], 4),
        "median_ratio": round(
            statistics.median(b / o for o, b in zip(times["ours"], times["baseline"])), 4
        ),
        "fingerprints_s": {k: round(v, 3) for k, v in fingerprints_s.items()},
        "bytes_per_token": round(manifest["bytes_per_token"], 2),
        "max_prob_error": round(max_prob_error(records, truth), 5),
        "ids_as_baseline": round(float(same[kept].mean()), 5),  # kept slots, same id as the loop
        "kept_slots": round(float(kept.mean()), 4),  # the rest had probability code 0
    }
    return result, records if name == TARGET else []


def clm_loss(logits, labels):
    """Plain causal-LM cross-entropy: position t predicts labels[t + 1]."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def fused_loss(logits, batch):
    return fusion_loss_parts(
        logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"], lam=LAM
    )[0]


def bench_train_step(records, args, device, sync) -> dict:
    model, tokenizer = load(TARGET, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = collate(
        records[: args.train_batch], pad_id=tokenizer.pad_token_id or 0, max_length=args.block_size
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    losses = {
        "fused": lambda logits: fused_loss(logits, batch),
        "clm": lambda logits: clm_loss(logits, batch["labels"]),
    }

    def step(mode):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses[mode](logits).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {m: [] for m in losses}
    for i in range(1 + args.steps):  # the first round is a warm-up (AdamW state, allocator)
        for mode in ("fused", "clm") if i % 2 == 0 else ("clm", "fused"):
            elapsed, _ = timed(sync, step, mode)
            if i:
                times[mode].append(elapsed)
    median = {m: statistics.median(t) for m, t in times.items()}

    # The objectives alone, forward and backward on fixed logits: their own share of a step.
    with torch.no_grad():
        fixed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss_only(mode):
        losses[mode](fixed.detach().requires_grad_()).backward()

    loss_times: dict[str, list[float]] = {m: [] for m in losses}
    for i in range(1 + 4 * args.steps):
        for mode in ("fused", "clm") if i % 2 == 0 else ("clm", "fused"):
            elapsed, _ = timed(sync, loss_only, mode)
            if i:
                loss_times[mode].append(elapsed)
    loss_median = {m: statistics.median(t) for m, t in loss_times.items()}
    tokens = int(batch["attention_mask"].sum())
    return {
        "model": TARGET,
        "batch": list(batch["input_ids"].shape),
        "tokens": tokens,
        "lam": LAM,
        "top_k": int(batch["topk_ids"].shape[-1]),
        "fused_s": [round(t, 3) for t in times["fused"]],
        "clm_s": [round(t, 3) for t in times["clm"]],
        "fused_tokens_per_s": round(tokens / median["fused"], 1),
        "clm_tokens_per_s": round(tokens / median["clm"], 1),
        "ratio": round(median["fused"] / median["clm"], 4),
        "best_ratio": round(min(times["fused"]) / min(times["clm"]), 4),
        "fused_loss_only_s": round(loss_median["fused"], 4),
        "clm_loss_only_s": round(loss_median["clm"], 4),
        "loss_only_ratio": round(loss_median["fused"] / loss_median["clm"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated; the target (first) gives the training step its targets",
    )
    parser.add_argument("--pieces", type=int, default=8, help="pieces per model")
    parser.add_argument("--block-size", type=int, default=256, help="most tokens a piece reads")
    parser.add_argument("--margin", type=int, default=8, help="room for the frame's tokens")
    parser.add_argument("--batch-size", type=int, default=4, help="extraction batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--train-batch", type=int, default=2, help="pieces per training step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each side")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own)"
    )
    parser.add_argument("--max-bytes", type=int, default=20_000, help="fusion text per domain")
    args = parser.parse_args()
    models = args.models.split(",")
    if models[0] != TARGET:
        parser.error(f"the first model must be the target {TARGET}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()

    tokenizers = [AutoTokenizer.from_pretrained(ensure_model(m, progress=False)) for m in models]
    texts = real_pieces(tokenizers, args.pieces, args.block_size, args.margin, args.max_bytes)
    print(
        f"{card}, {threads} threads, load average {load_before:.1f}; {len(texts)} pieces of "
        f"real text (<= {args.block_size - args.margin} tokens each), batch {args.batch_size}, "
        f"top-{TOP_K}, {args.repeats} runs of each side"
    )
    extraction, target_records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            result, records = bench_extraction(name, texts, args, device, sync, Path(tmp))
            extraction.append(result)
            target_records += records
    print(
        f"\n{'model':<30}{'vocab':>9}{'tokens':>8}{'ours tok/s':>12}{'plain tok/s':>13}"
        f"{'ratio':>8}{'median':>8}{'B/token':>9}{'max dp':>9}"
    )
    for r in extraction:
        print(
            f"{r['model']:<30}{r['vocab']:>9,}{r['tokens']:>8}{r['ours_tokens_per_s']:>12.1f}"
            f"{r['baseline_tokens_per_s']:>13.1f}{r['ratio']:>8.3f}{r['median_ratio']:>8.3f}"
            f"{r['bytes_per_token']:>9.2f}{r['max_prob_error']:>9.4f}"
        )
    print(
        f"(goals: ratio >= {EXTRACT_GOAL}, B/token <= {BYTES_GOAL}; max dp: largest error of a "
        "stored probability; model + tokenizer fingerprints, in each extraction: "
        + ", ".join(
            f"{r['model'].split('-')[0]} {r['fingerprints_s']['model']:.2f} + "
            f"{r['fingerprints_s']['tokenizer']:.2f} s"
            for r in extraction
        )
        + ")"
    )

    step = bench_train_step(target_records, args, device, sync)
    print(
        f"\ntraining step, {TARGET}, batch {step['batch'][0]} x {step['batch'][1]} "
        f"({step['tokens']} tokens), AdamW:"
    )
    print(
        f"  fused (lambda {LAM}, top-{step['top_k']}): {statistics.median(step['fused_s']):7.2f} s"
        f"  {step['fused_tokens_per_s']:8.1f} tokens/s"
    )
    print(
        f"  plain CLM:                 {statistics.median(step['clm_s']):7.2f} s"
        f"  {step['clm_tokens_per_s']:8.1f} tokens/s"
    )
    print(
        f"  loss alone (forward + backward on fixed logits): fused {step['fused_loss_only_s']:.3f} s,"
        f" CLM {step['clm_loss_only_s']:.3f} s"
    )
    print(f"  ratio {step['ratio']:.3f} (best/best {step['best_ratio']:.3f}; goal <= {STEP_GOAL})")
    total = time.perf_counter() - started
    print(
        f"\n{total:.0f} s in all; load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    emit(
        {
            "bench": "real",
            "device": card,
            "threads": threads,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "seconds": round(total, 1),
            "pieces": len(texts),
            "batch_size": args.batch_size,
            "top_k": TOP_K,
            "extraction": extraction,
            "extraction_ratios": {r["model"]: r["ratio"] for r in extraction},
            "bytes_per_token": {r["model"]: r["bytes_per_token"] for r in extraction},
            "max_prob_error": {r["model"]: r["max_prob_error"] for r in extraction},
            "train_step": step,
            "train_step_ratio": step["ratio"],
            "goals": {
                "extraction_ratio_min": EXTRACT_GOAL,
                "bytes_per_token_max": BYTES_GOAL,
                "train_step_ratio_max": STEP_GOAL,
            },
        }
    )


if __name__ == "__main__":
    main()
