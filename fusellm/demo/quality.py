"""The quality protocol's statistics: candidates, spread over seeds, paired differences, choice.

`benchmarks/bench_quality.py` trains each candidate recipe and the CLM baseline with several
seeds and hands the per-seed bits per byte here. A difference is a win only when its mean lies
more than twice its sample standard deviation below zero; the recipe is chosen on the
validation texts only (`choose`), the test texts are for reporting.
"""

from __future__ import annotations

import math
import statistics

from fusellm.demo.data import DOMAINS
from fusellm.demo.recipe import DemoRecipe

COLUMNS = (*DOMAINS, "mean")


def candidates(base: DemoRecipe) -> dict[str, DemoRecipe]:
    """The recipes compared: the paper's top-10 without and with the rest bucket, top-100.

    The rest bucket asks for the teacher's real probabilities (about a third of the mass on the
    top 10 here) rather than all of it, a weaker pull per step than the renormalised target;
    the ``-lam`` variants give that calibrated target more weight. ``k10-token`` chooses the
    candidate per position (MinCE on each position's CE) instead of per piece; ``k10-next``
    credits a source's mass on its own next token to the target's own next token.
    """
    k10, k100 = {"top_k": 10, "rest_bucket": False}, {"top_k": 100, "rest_bucket": False}
    rest = {"rest_bucket": True}
    return {
        "k10": base.model_copy(update=k10),
        "k10-lam0.8": base.model_copy(update={**k10, "lam": 0.8}),
        "k10-token": base.model_copy(update={**k10, "granularity": "token"}),
        "k10-next": base.model_copy(update={**k10, "next_token": "target"}),
        "k10-rest": base.model_copy(update={**k10, **rest}),
        "k10-rest-lam0.7": base.model_copy(update={**k10, **rest, "lam": 0.7}),
        "k10-rest-lam0.5": base.model_copy(update={**k10, **rest, "lam": 0.5}),
        "k100": base.model_copy(update=k100),
        "k100-rest": base.model_copy(update={**k100, **rest}),
    }


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1) of per-seed values."""
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def summarise(runs: dict[int, dict], baselines: dict[int, dict]) -> dict:
    """Per column: fused, baseline and paired difference (fused - baseline) over seeds."""
    seeds = sorted(runs)
    out = {}
    for c in COLUMNS:
        fused = [runs[s]["fused"][c] for s in seeds]
        base = [baselines[s][c] for s in seeds]
        diff = spread([f - b for f, b in zip(fused, base)])
        diff["win"] = diff["mean"] < 0 and -diff["mean"] > 2 * diff["sd"]
        out[c] = {"fused": spread(fused), "baseline": spread(base), "difference": diff}
    return out


def choose(
    validation: dict[str, dict],
    sources: dict[str, dict],
    recipes: dict[str, DemoRecipe],
    fused: dict[str, dict[int, float]],
) -> tuple[str | None, str]:
    """The recipe to ship, from validation numbers only.

    Eligible: beats the baseline on the mean by more than twice the paired sd, and every source
    on the mean. The best is the eligible recipe of largest mean gain. The paper's top-10 (ten
    times cheaper to extract and store than top-100) is preferred when one is eligible and not
    significantly worse than the best: its per-seed difference to the best (`fused`: seed ->
    validation mean) within twice its sd.
    """
    best_source = min(row["mean"] for row in sources.values())
    eligible = {
        name: s["mean"]["difference"]["mean"]
        for name, s in validation.items()
        if s["mean"]["difference"]["win"] and s["mean"]["fused"]["mean"] < best_source
    }
    if not eligible:
        return None, "no candidate beats the baseline by 2 sd and every source on validation"
    best = min(eligible, key=eligible.get)
    if recipes[best].top_k == 10:
        return best, "largest validation gain, and a top-10 recipe"
    for name in sorted(eligible, key=eligible.get):
        if recipes[name].top_k != 10:
            continue
        gap = spread([fused[name][s] - fused[best][s] for s in sorted(fused[best])])
        if gap["mean"] <= 2 * gap["sd"]:
            return name, f"top-10 within noise of {best} on validation ({fmt(gap, True)})"
        return best, (
            f"largest validation gain; the best top-10, {name}, is worse by "
            f"{fmt(gap, True)} bits/byte (more than 2 sd)"
        )
    return best, "largest validation gain (no top-10 recipe eligible)"


def fmt(s: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{s['mean']:{sign}.4f} ± {s['sd']:.4f}"
