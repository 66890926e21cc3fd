"""The quality protocol's statistics (fusellm.demo.quality): spread, paired wins, the choice."""

from __future__ import annotations

import math

import pytest

from fusellm.demo.data import DOMAINS
from fusellm.demo.quality import COLUMNS, candidates, choose, spread, summarise
from fusellm.demo.recipe import DEFAULT_DEMO_RECIPE

SEEDS = (0, 1, 2)


def rows(means: list[float]) -> dict[int, dict]:
    """Per seed, a table row whose every column is that seed's value."""
    return {s: {c: m for c in COLUMNS} for s, m in zip(SEEDS, means)}


def test_spread_is_mean_and_sample_sd():
    got = spread([1.0, 2.0, 3.0])
    assert (got["mean"], got["sd"], got["n"]) == (2.0, 1.0, 3)
    assert math.isnan(spread([1.0])["sd"])


def test_a_win_is_paired_and_beyond_two_sd():
    base = rows([2.30, 2.20, 2.40])  # seeds far apart: unpaired sds would hide the gain
    fused = {s: {"fused": {c: v - 0.004 + 0.0005 * s for c, v in row.items()}}
             for s, row in base.items()}
    out = summarise(fused, base)
    assert set(out) == set(COLUMNS) == {*DOMAINS, "mean"}
    diff = out["mean"]["difference"]
    assert diff["mean"] == pytest.approx(-0.0035) and diff["sd"] == pytest.approx(0.0005)
    assert diff["win"] is True
    noisy = {s: {"fused": {c: v + (0.004 if s == 1 else -0.004) for c, v in row.items()}}
             for s, row in base.items()}
    assert summarise(noisy, base)["mean"]["difference"]["win"] is False


def _validation(gains: dict[str, list[float]], baseline: list[float]):
    base = rows(baseline)
    fused = {n: {s: b - g for s, b, g in zip(SEEDS, baseline, gs)} for n, gs in gains.items()}
    summary = {
        n: summarise({s: {"fused": {c: v for c in COLUMNS}} for s, v in f.items()}, base)
        for n, f in fused.items()
    }
    return summary, fused


RECIPES = candidates(DEFAULT_DEMO_RECIPE)
SOURCES = {"a": {"mean": 2.40}, "b": {"mean": 2.35}}


def test_top_10_is_kept_only_within_noise_of_the_best():
    baseline = [2.284, 2.283, 2.285]
    far = {"k10-rest": [0.0031, 0.0020, 0.0012], "k100": [0.0081, 0.0044, 0.0050]}
    summary, fused = _validation(far, baseline)
    pick, why = choose(summary, SOURCES, RECIPES, fused)
    assert pick == "k100" and "k10-rest" in why and "more than 2 sd" in why
    near = {"k10": [0.0058, 0.0045, 0.0051], "k100": [0.0061, 0.0046, 0.0050]}
    summary, fused = _validation(near, baseline)
    pick, why = choose(summary, SOURCES, RECIPES, fused)
    assert pick == "k10" and "within noise" in why


def test_no_choice_without_a_win_over_baseline_and_every_source():
    baseline = [2.284, 2.283, 2.285]
    summary, fused = _validation({"k100": [0.004, -0.003, 0.001]}, baseline)
    assert choose(summary, SOURCES, RECIPES, fused)[0] is None  # inside the noise
    summary, fused = _validation({"k100": [0.005, 0.004, 0.005]}, baseline)
    strong = {"a": {"mean": 2.10}}  # a source better than any fused model
    assert choose(summary, strong, RECIPES, fused)[0] is None
    assert choose(summary, SOURCES, RECIPES, fused)[0] == "k100"


def test_candidates_differ_from_the_default_only_where_named():
    assert RECIPES["k10"].top_k == 10 and not RECIPES["k10"].rest_bucket
    assert RECIPES["k10-rest"].rest_bucket and RECIPES["k10-rest"].top_k == 10
    assert RECIPES["k100"].model_dump() == DEFAULT_DEMO_RECIPE.model_copy(
        update={"top_k": 100, "rest_bucket": False}
    ).model_dump()
