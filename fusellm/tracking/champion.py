"""When a new fused model becomes the champion: the rule alone, no MLflow.

FuseLLM's claim is relative, so a version must beat every source it was fused from and the
current champion; a tie does not move the alias. Kept apart from registration so the rule can
be read and tested on plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def beats(score: float, other: float, lower_is_better: bool) -> bool:
    """Strictly better: a tie does not move the champion."""
    return score < other if lower_is_better else score > other


def champion_decision(
    score: float,
    source_scores: Mapping[str, float],
    champion_score: float | None,
    lower_is_better: bool,
) -> tuple[bool, str]:
    """Whether a new version becomes champion, and why: it must beat every source and the
    current champion (when there is one)."""
    word = "lower" if lower_is_better else "higher"
    lost = [n for n, s in source_scores.items() if not beats(score, s, lower_is_better)]
    if lost:
        detail = ", ".join(f"{n}={source_scores[n]:g}" for n in lost)
        return False, f"score {score:g} does not beat source(s) {detail} ({word} is better)"
    if champion_score is not None and not beats(score, champion_score, lower_is_better):
        return (
            False,
            f"score {score:g} does not beat the champion's {champion_score:g} ({word} is better)",
        )
    against = "every source" + (
        f" and the champion ({champion_score:g})" if champion_score is not None else ""
    )
    return True, f"score {score:g} beats {against} ({word} is better)"


def check_scores(scores: Mapping[str, float], fused: str, sources: list[str]) -> dict[str, float]:
    """The fused model's and every source's score as floats; a missing or odd one raises early,
    before a model is loaded or a version registered."""
    missing = [n for n in [fused, *sources] if n not in scores]
    if missing:
        raise ValueError(
            f"scores has no entry for {', '.join(map(repr, missing))}; expected the primary metric "
            f"of the fused model {fused!r} and of every source {sources}, got keys {sorted(scores)}"
        )
    checked = {}
    for name in [fused, *sources]:
        value = scores[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"scores[{name!r}] must be a finite number, got {value!r}")
        checked[name] = float(value)
    return checked
