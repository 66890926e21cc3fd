"""Evaluation of every model on every suite, the comparison, and the scores that pick a champion."""

from __future__ import annotations

from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.io.sources import ModelRef
from fusellm.stages.base import (
    Artifact,
    ModelFiles,
    StageError,
    Unit,
    device_for,
    stage_key,
)


def _hub_revision(dataset_path: str) -> str:
    from huggingface_hub import HfApi

    return HfApi().dataset_info(dataset_path).sha


def suite_data_identity(suite: str, data_dir: Path | None) -> dict:
    """What a suite reads, by content: local files by their hash, Hub datasets by revision.

    Missing data raises the suite's own error (naming every file) before any model loads.
    Tasks left out for want of a toolchain are listed: they change the suite's average.
    """
    from fusellm.evaluate.data import EvalDataSource
    from fusellm.evaluate.suites import resolve
    from fusellm.io.files import sha256_file

    data = EvalDataSource(data_dir=data_dir) if data_dir is not None else None
    resolved = resolve(suite, data)
    tasks = {}
    for member in resolved.spec["task"]:
        files = (member.get("dataset_kwargs") or {}).get("data_files")
        if files:
            tasks[member["task"]] = {split: sha256_file(p) for split, p in sorted(files.items())}
        else:
            from fusellm.evaluate.suites import task_data, task_manager

            item = task_data(task_manager(suite), member["task"], {})
            tasks[member["task"]] = f"{item.dataset_path}@{_hub_revision(item.dataset_path)}"
    return {"tasks": tasks, "skipped": sorted(resolved.skipped)}


def evaluate_key(model_key: str, label: str, suite: str, config: FusionConfig) -> str:
    """Scores depend on the model (its key holds its document frame), the suite's tasks and
    data (by content) and the limits."""
    ev = config.evaluation
    return stage_key(
        "evaluate",
        model=model_key,
        label=label,
        suite=suite,
        data=suite_data_identity(suite, ev.data_dir),
        limit=ev.limit,
        max_gen_toks=ev.max_gen_toks,
        backend=ev.backend,  # another engine: generations may differ by float rounding
    )


def evaluate_unit(
    model_dir: Path,
    model_key: str,
    label: str,
    suite: str,
    config: FusionConfig,
    *,
    loaded_as: ModelFiles | None = None,
) -> Unit:
    """Score one model on one suite with lm-eval; keeps results and lm-eval's sample logs.

    `loaded_as`: the config's model whose loading options (remote code, document frame) apply;
    a trained model is loaded as its target.
    """
    from fusellm.data.framing import document_frame
    from fusellm.evaluate import run_suite

    ev = config.evaluation
    ref = loaded_as.ref if loaded_as is not None else ModelRef(uri=str(model_dir))
    trust_remote_code = ref.trust_remote_code

    def build(folder: Path) -> dict:
        from fusellm.io.sources import load_tokenizer

        tokenizer = load_tokenizer(model_dir, ref)
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
            tokenizer=tokenizer,
            frame=document_frame(tokenizer, ref.document_start, ref.document_end),
            backend=ev.backend,
        )
        return {
            "label": label,
            "suite": suite,
            "average": result.average,
            "primary_metric": result.primary_metric,
        }

    key = evaluate_key(model_key, label, suite, config)
    label_ = f"evaluate-{label}-{suite}"
    spec = {"model": label, "suite": suite}
    return Unit("evaluate", key, label_, config.workdir, build, inputs=(model_key,), spec=spec)


Results = dict[str, dict[str, Artifact]]  # model label -> suite -> evaluation


def compare_key(results: Results, fused: str, baseline: str, sources: list[str]) -> str:
    return stage_key(
        "compare",
        results={label: {s: a.key for s, a in suites.items()} for label, suites in results.items()},
        roles={"fused": fused, "baseline": baseline, "sources": sources},
    )


def compare_unit(
    results: Results, fused: str, baseline: str, sources: list[str], workdir: Path
) -> Unit:
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

    key = compare_key(results, fused, baseline, sources)
    inputs = tuple(a.key for suites in results.values() for a in suites.values())
    return Unit("compare", key, "compare", workdir, build, inputs=inputs)


def primary_scores(results: Results, suite: str) -> dict[str, float] | None:
    """Each model's average of the primary suite's own metric (what decides the champion).

    None when some evaluation is not done yet (a plan).
    """
    if not all(suites[suite].done for suites in results.values()):
        return None
    out = {}
    for label, suites in results.items():
        value = suites[suite].info.get("average")
        if value is None:
            raise StageError(
                f"{label}: suite {suite} produced no {suites[suite].info.get('primary_metric')}"
            )
        out[label] = float(value)
    return out
