"""Scaling of every stage: throughput and peak memory at 1x, 4x and 16x the corpus.

Three tiny random-weight models of the demo's architectures (Llama with a SentencePiece-style BPE
tokenizer, GPT-NeoX and GPT-2 with two different byte-level BPEs, all trained here on stdlib
text), target = the Llama one, all three as sources; corpora of 0.5, 2 and 8 MB of text that
ships with Python (nested, same mix of prose, code and docstrings); the `local` evaluation suite
on a fixed small held-out set; a fixed number of training steps; no model registration.

Every stage runs through the real pipeline (`fusellm.stages.pipeline.walk`, library `Executor`),
each in a fresh process (`_scale_child.py`): it walks up to the stage before (those folders
exist), then runs the stage and reports wall time, CPU time and peak RSS, both for the whole
process and above the RSS the stage started from. Align-and-fuse runs with one worker (in the
process, so its memory is measured there), and so do pieces; then both run again at the largest
size with one and with two worker processes for their parallel speedups. Throughput counts:

    pieces, vocab, align_fuse   target tokens of the corpus (vocab maps do not read the corpus)
    extract                     tokens of all three models
    train                       tokens trained (fused model and CLM baseline, fixed steps)
    evaluate                    target tokens of the held-out set x models scored (fixed)

so a ratio of 1 is linear cost, below 1 grows faster than the corpus, above 1 is a fixed cost
being spread. The projection to MiniPile is in `_scale_project.py` and docs/scaling.md.

    .venv/bin/python benchmarks/bench_scale.py                  # ~13 min on 2 busy cores
    .venv/bin/python benchmarks/bench_scale.py --quick          # 0.1 / 0.4 / 1.6 MB, ~5 min
    .venv/bin/python benchmarks/bench_scale.py --sizes 1 4 --base-bytes 200000 --keep
    .venv/bin/python benchmarks/bench_scale.py --parallel-only --repeats 3   # after --keep

The last line of output is one JSON object: per stage `throughput_ratio_16x` (throughput at the
largest size over the smallest) and `rss_ratio_16x` (peak RSS, same), the pieces and
align-and-fuse speedups with 2 workers over 1, the projection, and which acceptance figures hold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _scale_assets as assets
import _scale_project as projection
from _common import ROOT, TOKENIZERS, emit

STAGES = ("pieces", "extract", "vocab", "align_fuse", "train", "evaluate")
STREAMING = ("pieces", "extract", "align_fuse")  # memory should be bounded by one shard
CHILD = Path(__file__).with_name("_scale_child.py")
LIMITS = {"throughput_ratio": 0.8, "rss_ratio": 1.3, "fuse_speedup": 1.6, "hours": 1.0}


def fresh_caches(out: Path, size: int) -> dict:
    """A new, empty datasets cache per size: otherwise only the first size would pay for
    preparing the evaluation data, and evaluation would look cheaper at larger sizes."""
    folder = out / "hf-datasets" / f"{size}x"
    shutil.rmtree(folder, ignore_errors=True)
    return {"HF_DATASETS_CACHE": str(folder)}


def run_child(config: Path, stage: str, log: Path, env: dict | None = None) -> dict:
    """One stage in a fresh process; its `RESULT` line, or an error with its log's tail."""
    with open(log, "w") as err:
        proc = subprocess.run(
            [sys.executable, str(CHILD), str(config), stage],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, check=False,
            env={**os.environ, **(env or {})},
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); {log}:\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def write_config(path: Path, inputs: dict, size: int, workers: int = 1, shard_size: int = 256) -> Path:
    data = assets.fusion_config(
        inputs["models"], inputs["corpora"][size]["path"], inputs["eval_dir"],
        inputs["out"] / "work" / f"{size}x", shard_size=shard_size, workers=workers,
    )
    path.write_text(json.dumps(data, indent=1))
    return path


def prepare_inputs(out: Path, sizes: list[int], base_bytes: int) -> dict:
    """Models (cached by recipe), the nested corpora and the held-out set."""
    models = assets.build_models(out / f"models-{assets.models_key()}")
    stream = assets.corpus_stream()
    corpora = {}
    for size in sizes:
        folder = out / "corpus" / f"{size}x"
        info = assets.write_corpus(folder, assets.corpus_prefix(stream, size * base_bytes))
        corpora[size] = {"path": folder, **info}
    eval_dir = out / "eval"
    assets.write_eval_data(eval_dir)
    return {"out": out, "models": models, "corpora": corpora, "eval_dir": eval_dir}


def heldout_tokens(inputs: dict) -> int:
    """Target tokens of every text the evaluation scores, once."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(inputs["models"]["llama"]))
    texts = assets.heldout_texts(inputs["eval_dir"])
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


def measure_size(inputs: dict, size: int, args) -> dict:
    """Every stage at one corpus size, each in its own process, in pipeline order."""
    work = inputs["out"] / "work" / f"{size}x"
    shutil.rmtree(work, ignore_errors=True)
    logs = inputs["out"] / "logs"
    logs.mkdir(exist_ok=True)
    config = write_config(inputs["out"] / f"config-{size}x.json", inputs, size,
                          shard_size=args.shard_size)
    results, env = {}, fresh_caches(inputs["out"], size)
    for stage in STAGES:
        results[stage] = run_child(config, stage, logs / f"{size}x-{stage}.log", env)
        print(f"  {size:>3}x {stage:<10} {results[stage]['seconds']:7.1f} s", file=sys.stderr)
    return results


# What a parallel comparison removes before each run, and the seconds it compares.
PARALLEL = {
    "pieces": (("pieces",), lambda r: r["units"]["pieces"]),
    "align_fuse": (("fuse", "fused"), lambda r: r["units"]["fuse"]),
}


def parallel_speedup(inputs: dict, size: int, stage: str, workers: int, repeats: int,
                     args) -> dict:
    """The stage's wall time with 1 and with `workers` processes (`pieces.workers`,
    `fusion.workers`), paired, its folders removed before each run; the speedup is the median
    of the pairs' ratios. Rebuilt folders are the same (same keys, same content)."""
    work = inputs["out"] / "work" / f"{size}x"
    logs = inputs["out"] / "logs"
    folders, seconds_of = PARALLEL[stage]
    runs = {1: [], workers: []}
    for rep in range(repeats):
        for w in (1, workers):
            for folder in folders:
                shutil.rmtree(work / folder, ignore_errors=True)
            config = write_config(inputs["out"] / f"config-{size}x-w{w}.json", inputs, size,
                                  workers=w, shard_size=args.shard_size)
            result = run_child(config, stage, logs / f"{size}x-{stage}-w{w}-{rep}.log")
            runs[w].append(result)
            print(f"  {size:>3}x {stage}, {w} worker(s): {seconds_of(result):.1f} s",
                  file=sys.stderr)
    pairs = [seconds_of(a) / seconds_of(b) for a, b in zip(runs[1], runs[workers])]
    return {
        "stage": stage,
        "workers": workers,
        "speedup": statistics.median(pairs),
        "pairs": [round(p, 3) for p in pairs],
        "seconds": {str(w): [round(seconds_of(r), 2) for r in rs] for w, rs in runs.items()},
        "worker_peak_mb": max(r["workers_mb"] for r in runs[workers]),
        "cpu_seconds": {str(w): [round(r["cpu_seconds"], 2) for r in rs] for w, rs in runs.items()},
    }


def parallel_runs(inputs: dict, size: int, args) -> dict:
    """Both parallel stages, 1 worker against `--workers`, at the largest size."""
    return {
        stage: parallel_speedup(inputs, size, stage, args.workers, args.fuse_repeats, args)
        for stage in PARALLEL
    }


def corpus_summary(measured: dict, inputs: dict) -> dict:
    """Per size: text, documents, pieces, shards and target tokens (the units of work)."""
    out = {}
    for size, results in measured.items():
        corpus = inputs["corpora"][size]
        out[str(size)] = {
            "bytes": corpus["bytes"],
            "documents": corpus["documents"],
            "pieces": results["pieces"]["pieces"],
            "shards": results["pieces"]["shards"],
            "target_tokens": results["extract"]["tokens"]["llama"],
        }
    return out


def stage_tokens(stage: str, results: dict, held: int) -> int:
    """The tokens a stage's throughput is counted in (see the module docstring)."""
    r = results[stage]
    target = results["extract"]["tokens"]["llama"]
    if stage == "extract":
        return sum(r["tokens"].values())
    if stage == "train":
        return sum(r["tokens"].values())
    if stage == "evaluate":
        return held * r["models"]
    return target


def rows_of(measured: dict, inputs: dict, held: int) -> list[dict]:
    rows = []
    for size, results in measured.items():
        for stage in STAGES:
            r, tokens = results[stage], stage_tokens(stage, results, held)
            rows.append({
                "size": size, "stage": stage, "bytes": inputs["corpora"][size]["bytes"],
                "tokens": tokens, "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
                "tokens_per_s": tokens / r["seconds"], "tokens_per_cpu_s": tokens / r["cpu_seconds"],
                "peak_mb": r["peak_mb"], "start_mb": r["start_mb"], "above_mb": r["above_mb"],
                "workers_mb": r["workers_mb"], "units": r["units"],
            })
    return rows


def ratios(rows: list[dict], small: int, large: int) -> dict:
    """Per stage: largest size over smallest, for throughput (wall and CPU) and memory."""
    at = {(r["size"], r["stage"]): r for r in rows}
    n = large // small
    out = {}
    for stage in STAGES:
        a, b = at[(small, stage)], at[(large, stage)]
        out[stage] = {
            f"throughput_ratio_{n}x": round(b["tokens_per_s"] / a["tokens_per_s"], 3),
            f"cpu_throughput_ratio_{n}x": round(b["tokens_per_cpu_s"] / a["tokens_per_cpu_s"], 3),
            f"rss_ratio_{n}x": round(b["peak_mb"] / a["peak_mb"], 3),
            f"rss_above_start_ratio_{n}x": round(b["above_mb"] / max(a["above_mb"], 1.0), 3),
            "tokens_per_s": {str(r["size"]): round(r["tokens_per_s"]) for r in rows if r["stage"] == stage},
            "seconds": {str(r["size"]): round(r["seconds"], 2) for r in rows if r["stage"] == stage},
            "peak_mb": {str(r["size"]): round(r["peak_mb"]) for r in rows if r["stage"] == stage},
            "above_start_mb": {str(r["size"]): round(r["above_mb"]) for r in rows if r["stage"] == stage},
            "units_seconds": {str(r["size"]): r["units"] for r in rows if r["stage"] == stage},
        }
    return out


def projection_rates(rows: list[dict], inputs: dict, large: int, maps: list) -> dict:
    """Per core-second rates at the largest size, the inputs of `_scale_project.project`."""
    at = {(r["size"], r["stage"]): r for r in rows}
    pieces, fuse = at[(large, "pieces")], at[(large, "align_fuse")]
    text = inputs["corpora"][large]["bytes"]
    return {
        "pieces_bytes_per_cpu_s": text / pieces["cpu_seconds"],
        "fuse_tokens_per_cpu_s": fuse["tokens"] / fuse["cpu_seconds"],
        "fuse_bytes_per_cpu_s": text / fuse["cpu_seconds"],
        "vocab_map_seconds": [round(s, 2) for s in maps],
    }


def acceptance(stages: dict, n: int, speedup: float | None, proj: dict) -> dict:
    low = {s: v[f"throughput_ratio_{n}x"] for s, v in stages.items()}
    rss = {s: stages[s][f"rss_ratio_{n}x"] for s in STREAMING}
    above = {s: stages[s][f"rss_above_start_ratio_{n}x"] for s in STREAMING}
    hours = proj["pieces_vocab_align_fuse_hours"]
    return {
        "throughput_ratio_ge_0.8": {s: v >= LIMITS["throughput_ratio"] for s, v in low.items()},
        "streaming_rss_ratio_le_1.3": {s: v <= LIMITS["rss_ratio"] for s, v in rss.items()},
        "streaming_rss_above_start_ratio_le_1.3": {
            s: v <= LIMITS["rss_ratio"] for s, v in above.items()
        },
        "fuse_speedup_2_ge_1.6": None if speedup is None else speedup >= LIMITS["fuse_speedup"],
        "minipile_pieces_vocab_fuse_under_1h": hours < LIMITS["hours"],
    }


def print_tables(rows: list[dict], stages: dict, n: int, proj: dict, parallel: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160, stderr=False)
    table = Table(title="Every stage at each corpus size (one fresh process per stage)")
    for col in ("stage", "corpus", "tokens", "wall s", "CPU s", "tokens/s", "tokens/CPU-s",
                "peak RSS MB", "above start MB", "workers MB"):
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: (STAGES.index(r["stage"]), r["size"])):
        table.add_row(
            r["stage"], f"{r['size']}x {r['bytes'] / 1e6:.1f} MB", f"{r['tokens']:,}",
            f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_cpu_s']:,.0f}", f"{r['peak_mb']:.0f}", f"{r['above_mb']:.0f}",
            f"{r['workers_mb']:.0f}" if r["workers_mb"] else "-",
        )
    console.print(table)
    summary = Table(title=f"Largest over smallest corpus ({n}x the text)")
    for col in ("stage", "throughput", "throughput per CPU-s", "peak RSS", "RSS above start"):
        summary.add_column(col, justify="right")
    for stage, v in stages.items():
        summary.add_row(stage, *(f"{v[k]:.2f}" for k in (
            f"throughput_ratio_{n}x", f"cpu_throughput_ratio_{n}x", f"rss_ratio_{n}x",
            f"rss_above_start_ratio_{n}x")))
    console.print(summary)
    for stage, run in (parallel or {}).items():
        console.print(
            f"{stage}, {run['workers']} workers vs 1: {run['speedup']:.2f}x "
            f"(seconds {run['seconds']}, worker peak {run['worker_peak_mb']:.0f} MB)"
        )
    proj_table = Table(title="Projected wall time for MiniPile (64 cores, 8 x H100 at 40 % MFU)")
    proj_table.add_column("stage")
    proj_table.add_column("seconds", justify="right")
    proj_table.add_column("hours", justify="right")
    for stage, seconds in proj["seconds"].items():
        shown = "-" if seconds is None else f"{seconds:,.0f}"
        hours = "-" if seconds is None else f"{seconds / 3600:.2f}"
        proj_table.add_row(stage, shown, hours)
    console.print(proj_table)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16],
                        help="corpus sizes as multiples of --base-bytes")
    parser.add_argument("--base-bytes", type=int, default=500_000, help="text of the 1x corpus")
    parser.add_argument("--quick", action="store_true", help="base 100 kB: a fast, noisier run")
    parser.add_argument("--shard-size", type=int, default=256, help="extraction.shard_size")
    parser.add_argument("--workers", type=int, default=2,
                        help="pieces and align-and-fuse workers to compare with one")
    parser.add_argument("--repeats", dest="fuse_repeats", type=int, default=2,
                        help="paired 1 / N worker runs of each")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fusellm-bench-scale")
    parser.add_argument("--keep", action="store_true", help="keep the stage folders")
    parser.add_argument("--parallel-only", action="store_true",
                        help="only the 1 / N worker comparisons, on the largest size's folders "
                        "kept by an earlier --keep run (e.g. again on a quieter machine)")
    args = parser.parse_args(argv)
    if args.quick:
        args.base_bytes = 100_000
    args.sizes = sorted(set(args.sizes))
    if len(args.sizes) < 2 or args.sizes[0] < 1:
        parser.error("--sizes needs at least two positive multiples")
    return args


def parallel_only(args) -> dict:
    """The parallel comparisons alone, on stage folders an earlier `--keep` run left."""
    large = args.sizes[-1]
    if not (args.out / "work" / f"{large}x" / "extract").is_dir():
        raise SystemExit(f"no kept stage folders in {args.out / 'work' / f'{large}x'}; "
                         "run once with --keep first")
    inputs = prepare_inputs(args.out, [large], args.base_bytes)
    parallel = parallel_runs(inputs, large, args)
    result = {"bench": "scale-parallel", "size": large, **speedups(parallel, args.workers),
              "parallel": parallel, "load_average": [round(x, 2) for x in os.getloadavg()]}
    emit(result)
    return result


def speedups(parallel: dict | None, workers: int) -> dict:
    """The headline figures: each parallel stage's speedup with `workers` over one."""
    names = {"align_fuse": "fuse", "pieces": "pieces"}
    return {
        f"{names[stage]}_parallel_speedup_{workers}": round(run["speedup"], 3)
        for stage, run in (parallel or {}).items()
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.parallel_only:
        return parallel_only(args)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(args.out, args.sizes, args.base_bytes)
    maps = projection.vocab_map_seconds(TOKENIZERS)
    small, large = args.sizes[0], args.sizes[-1]
    measured = {}
    for size in args.sizes:
        measured[size] = measure_size(inputs, size, args)
        if size != large and not args.keep:
            shutil.rmtree(args.out / "work" / f"{size}x", ignore_errors=True)
    parallel = parallel_runs(inputs, large, args) if args.workers > 1 else None
    if not args.keep:
        shutil.rmtree(args.out / "work", ignore_errors=True)
    rows = rows_of(measured, inputs, heldout_tokens(inputs))
    n = large // small
    stages = ratios(rows, small, large)
    proj = projection.project(
        projection_rates(rows, inputs, large, maps)
    )
    print_tables(rows, stages, n, proj, parallel)
    headline = speedups(parallel, args.workers)
    result = {
        "bench": "scale",
        "sizes": args.sizes,
        "corpus": corpus_summary(measured, inputs),
        "stages": stages,
        **headline,
        "parallel": parallel,
        "projection": proj,
        "acceptance": acceptance(stages, n, headline.get(f"fuse_parallel_speedup_{args.workers}"), proj),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cores": os.cpu_count(),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
