"""Evaluation of every model on every suite, the comparison, and the scores that pick a champion."""

from __future__ import annotations

from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.io.sources import local_identity
from fusellm.stages.base import Artifact, StageError, build_stage, device_for, stage_key


def evaluate_key(model_key: str, label: str, suite: str, config: FusionConfig) -> str:
    ev = config.evaluation
    data = local_identity(ev.data_dir) if ev.data_dir is not None else "hub"
    return stage_key(
        "evaluate",
        model=model_key,
        label=label,
        suite=suite,
        data=data,
        limit=ev.limit,
        max_gen_toks=ev.max_gen_toks,
    )


def evaluate_model(
    model_dir: Path,
    model_key: str,
    label: str,
    suite: str,
    config: FusionConfig,
    workdir: Path,
    *,
    trust_remote_code: bool = False,
) -> Artifact:
    """Score one model on one suite with lm-eval; keeps results and lm-eval's sample logs."""
    from fusellm.evaluate import run_suite

    ev = config.evaluation

    def build(folder: Path) -> dict:
        result = run_suite(
            str(model_dir),
            suite,
            output_dir=folder / "result",
            data_dir=ev.data_dir,
            limit=ev.limit,
            batch_size=ev.batch_size,
            device=device_for("auto"),
            max_gen_toks=ev.max_gen_toks,
            trust_remote_code=trust_remote_code,
            label=label,
        )
        return {
            "label": label,
            "suite": suite,
            "average": result.average,
            "primary_metric": result.primary_metric,
        }

    key = evaluate_key(model_key, label, suite, config)
    return build_stage(workdir, "evaluate", key, build)


def compare_key(results: dict[str, dict[str, Artifact]]) -> str:
    return stage_key(
        "compare",
        results={label: {s: a.key for s, a in suites.items()} for label, suites in results.items()},
    )


def compare_models(
    results: dict[str, dict[str, Artifact]],
    fused: str,
    baseline: str,
    sources: list[str],
    workdir: Path,
) -> Artifact:
    """The fused vs sources vs CLM baseline table (markdown) and chart (PNG)."""
    from fusellm.evaluate import SuiteResult, compare

    def build(folder: Path) -> dict:
        loaded = {
            label: {
                suite: SuiteResult.load(a.path / "result" / "results.json")
                for suite, a in suites.items()
            }
            for label, suites in results.items()
        }
        compare(loaded, fused, baseline, sources, folder)
        return {"fused": fused, "baseline": baseline, "sources": sources}

    return build_stage(workdir, "compare", compare_key(results), build)


def primary_scores(results: dict[str, dict[str, Artifact]], suite: str) -> dict[str, float]:
    """Each model's average of the primary suite's own metric (what decides the champion)."""
    out = {}
    for label, suites in results.items():
        value = suites[suite].info.get("average")
        if value is None:
            raise StageError(
                f"{label}: suite {suite} produced no {suites[suite].info.get('primary_metric')}"
            )
        out[label] = float(value)
    return out
