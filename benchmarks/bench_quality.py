"""The quality protocol: is the fused model better than the CLM baseline, beyond seed noise?

One number from one training says little when the gain is a few thousandths of a bit per byte:
another seed (another data order) moves both models. So every candidate recipe is trained with
several seeds; for each seed the fused model and the CLM baseline (λ = 1) see the same pieces in
the same order (same seed), and we report, per domain and on the mean over domains, the mean
and sample standard deviation over seeds of the fused model, of the baseline, and of the paired
difference fused - baseline (negative = fused better). A difference counts as a win only when
its mean lies more than twice its standard deviation below zero.

Two held-out texts (`fusellm.demo.data`: the two halves of each domain's ``heldout`` split, by
content hash): recipes are chosen on ``validation``, results are reported on ``test``. Choosing
on test would flatter the winner.

Stage folders under ``--work`` are content-addressed (`fusellm.demo.recipe.run_recipe`), so
pieces, extraction and fusion run once per top-k, and the CLM baseline once per seed: its key
holds neither the top-k nor the fusion, and it never reads the rest-bucket flag, so a
rest-bucket candidate is paired with the baseline trained for the same seed by the candidates
without it. Re-running the same command reuses everything and only re-scores.

    FUSELLM_CACHE=~/.cache/fusellm .venv/bin/python benchmarks/bench_quality.py \\
        --work /var/tmp/fusellm-quality --seeds 0 1 2

With ``--real`` the same protocol runs on three real pretrained models (`fusellm.demo.real`:
target SmolLM2-135M, sources SmolLM2, Gemma-3-270M, Qwen2.5-Coder-0.5B), with less text:

    .venv/bin/python benchmarks/bench_quality.py --real --work /var/tmp/fusellm-real \
        --seeds 0 1 2 --candidates k10

Prints a table per part (validation, test), the validation choice, and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import emit

from fusellm.demo.data import HELDOUT_PARTS
from fusellm.demo.quality import COLUMNS, candidates, choose, fmt, summarise
from fusellm.demo.recipe import DEFAULT_DEMO_RECIPE


def print_tables(summary: dict, sources: dict, part: str, seeds: list[int]) -> None:
    """Markdown, ready for docs/demo-recipe.md."""
    print(f"\n### {part}: bits per byte, mean ± sd over seeds {seeds} (lower is better)\n")
    print("| model | " + " | ".join(COLUMNS) + " |")
    print("| --- |" + " --- |" * len(COLUMNS))
    for name, row in sources.items():
        print(f"| {name} (source) | " + " | ".join(f"{row[c]:.4f}" for c in COLUMNS) + " |")
    first = next(iter(summary.values()))
    cells = " | ".join(fmt(first[c]["baseline"]) for c in COLUMNS)
    print(f"| CLM baseline (λ = 1) | {cells} |")
    for name, s in summary.items():
        print(f"| fused {name} | " + " | ".join(fmt(s[c]["fused"]) for c in COLUMNS) + " |")
    for name, s in summary.items():
        cells = " | ".join(
            fmt(s[c]["difference"], signed=True)
            + (" **win**" if s[c]["difference"]["win"] else "")
            for c in COLUMNS
        )
        print(f"| fused {name} - baseline (paired) | {cells} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="persistent folder: stages are reused")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=["k10", "k10-rest", "k100"],
        help=f"some of {list(candidates(DEFAULT_DEMO_RECIPE))}",
    )
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument(
        "--real", action="store_true", help="three real pretrained models (fusellm.demo.real)"
    )
    args = parser.parse_args(argv)
    if len(args.seeds) < 3:
        print("fewer than 3 seeds: a screen, not the protocol (one seed has no spread)")

    from fusellm.demo.recipe import run_recipe
    from fusellm.demo.sources import build_sources

    options: dict = {}
    base = DEFAULT_DEMO_RECIPE
    if args.real:
        from fusellm.demo import real

        base = real.REAL_RECIPE
        options = {
            "heldout_bytes": real.REAL_HELDOUT_BYTES,
            "score_batch": real.REAL_SCORE_BATCH,
            "config_updates": real.REAL_CONFIG_UPDATES,
        }
    if args.steps:
        base = base.model_copy(update={"steps": args.steps})
    chosen = {name: candidates(base)[name] for name in args.candidates}
    order = sorted(chosen, key=lambda n: chosen[n].rest_bucket)  # baselines come with non-rest
    work = Path(args.work)
    paths = real.real_sources(progress=False) if args.real else build_sources(progress=False).paths
    started = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {name: {} for name in chosen}
    baselines: dict[str, dict[int, dict]] = {p: {} for p in HELDOUT_PARTS}  # part -> seed -> row
    baseline_model: dict[int, str] = {}
    sources: dict[str, dict] = {}
    for seed in args.seeds:
        for name in order:
            recipe = chosen[name].model_copy(update={"seed": seed})
            t0 = time.perf_counter()
            result = run_recipe(
                recipe,
                work,
                sources=paths,
                baseline=seed not in baseline_model,
                score_sources=not sources,
                progress=False,
                **options,
            )
            if not sources:
                sources = {
                    p: {n: row for n, row in result["tables"][p].items() if n in paths}
                    for p in HELDOUT_PARTS
                }
            if "baseline" in result["models"]:
                baseline_model[seed] = result["models"]["baseline"]
                for p in HELDOUT_PARTS:
                    baselines[p][seed] = result["tables"][p]["baseline"]
            runs[name][seed] = {
                p: {"fused": result["tables"][p]["fused"]} for p in HELDOUT_PARTS
            } | {"states": result["states"], "seconds": round(time.perf_counter() - t0, 1)}
            print(
                json.dumps(
                    {
                        "candidate": name,
                        "seed": seed,
                        "fused": {p: runs[name][seed][p]["fused"] for p in HELDOUT_PARTS},
                        "baseline": {p: baselines[p][seed] for p in HELDOUT_PARTS},
                        "states": result["states"],
                        "seconds": runs[name][seed]["seconds"],
                        "fused_stats": result["fused_stats"],
                    }
                ),
                flush=True,
            )

    summaries = {
        p: {
            name: summarise({s: r[p] for s, r in runs[name].items()}, baselines[p])
            for name in chosen
        }
        for p in HELDOUT_PARTS
    }
    for p in HELDOUT_PARTS:
        print_tables(summaries[p], sources[p], p, args.seeds)
    fused_validation = {
        name: {s: r["validation"]["fused"]["mean"] for s, r in runs[name].items()}
        for name in chosen
    }
    pick, why = choose(summaries["validation"], sources["validation"], chosen, fused_validation)
    print(f"\nchosen on validation: {pick} ({why})")
    if pick:
        test = summaries["test"][pick]["mean"]
        best = min(row["mean"] for row in sources["test"].values())
        print(
            f"test, {pick}: paired difference {fmt(test['difference'], signed=True)} "
            f"(win: {test['difference']['win']}); fused mean {test['fused']['mean']:.4f} vs best "
            f"source {best:.4f}"
        )
    emit(
        {
            "seeds": args.seeds,
            "recipes": {name: r.model_dump() for name, r in chosen.items()},
            "sources": sources,
            "summary": summaries,
            "chosen": pick,
            "why": why,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )


if __name__ == "__main__":
    main()
