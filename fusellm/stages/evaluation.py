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
    tokenizer_of,
)


def _hub_revision(dataset_path: str) -> str:
    from huggingface_hub import HfApi

    return HfApi().dataset_info(dataset_path).sha


def _files_identity(files):
    """Local data files by their hash (a mapping or list of them kept as such); a URL as is."""
    from fusellm.io.files import sha256_file

    if isinstance(files, dict):
        return {split: _files_identity(f) for split, f in sorted(files.items())}
    if isinstance(files, list):
        return [_files_identity(f) for f in files]
    return sha256_file(files) if Path(files).is_file() else str(files)


def custom_tasks(config: FusionConfig):
    """What the `custom` suite runs for this config (`evaluation.tasks`, `evaluation.task_dir`)."""
    from fusellm.evaluate.suites import CustomTasks

    ev = config.evaluation
    return CustomTasks(tuple(ev.tasks), ev.task_dir)


def suite_data_identity(suite: str, data_dir: Path | None, custom=None) -> dict:
    """What a suite reads, by content: local files by their hash, Hub datasets by revision.

    Missing data raises the suite's own error (naming every file) before any model loads.
    Tasks left out for want of a toolchain are listed: they change the suite's average.
    `custom` (`CustomTasks`, for the `custom` suite): its names, and its task folder by content.
    """
    from fusellm.evaluate.data import EvalDataSource
    from fusellm.evaluate.suites import folder_identity, resolve

    data = EvalDataSource(data_dir=data_dir) if data_dir is not None else None
    resolved = resolve(suite, data, custom=custom)
    tasks = {}
    for member in resolved.spec["task"]:
        files = (member.get("dataset_kwargs") or {}).get("data_files")
        if files:
            tasks[member["task"]] = _files_identity(files)
        else:
            path = resolved.datasets[member["task"]].dataset_path
            tasks[member["task"]] = f"{path}@{_hub_revision(path)}" if path else "no dataset"
    identity = {"tasks": tasks, "skipped": sorted(resolved.skipped)}
    if resolved.entries:
        identity["entries"] = resolved.entries
    if custom is not None and custom.task_dir is not None:
        identity["task_dir"] = folder_identity(custom.task_dir)
    return identity


def evaluate_key(model_key: str, label: str, suite: str, config: FusionConfig) -> str:
    """Scores depend on the model (its key holds its document frame), the suite's tasks and
    data (by content; for `custom`, the task folder too), the limits and the prompt format."""
    from fusellm.evaluate.suites import CUSTOM

    ev = config.evaluation
    custom = custom_tasks(config) if suite == CUSTOM else None
    return stage_key(
        "evaluate",
        model=model_key,
        label=label,
        suite=suite,
        data=suite_data_identity(suite, ev.data_dir, custom),
        limit=ev.limit,
        max_gen_toks=ev.max_gen_toks,
        backend=ev.backend,  # another engine: generations may differ by float rounding
        chat_template=ev.chat_template,
    )


def check_chat_template(label: str, model_dir: Path, loaded_as: ModelFiles | None) -> None:
    """With `evaluation.chat_template`, the model must have a template: checked when its
    evaluation is planned, before any suite runs. A trained model has its target's tokenizer,
    so the target's is read while the model is not trained yet."""
    from fusellm.evaluate.runner import require_chat_template

    if loaded_as is not None:
        tokenizer, folder = tokenizer_of(loaded_as), loaded_as.path
    elif Path(model_dir).is_dir():
        from fusellm.io.sources import load_tokenizer

        tokenizer, folder = load_tokenizer(model_dir, ModelRef(uri=str(model_dir))), model_dir
    else:
        return  # nothing to read yet: run_suite checks before loading the model
    name = label if Path(folder).name == label else f"{label} ({folder})"
    require_chat_template(tokenizer, name)


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
    from fusellm.evaluate.suites import CUSTOM

    ev = config.evaluation
    ref = loaded_as.ref if loaded_as is not None else ModelRef(uri=str(model_dir))
    trust_remote_code = ref.trust_remote_code
    if ev.chat_template:
        check_chat_template(label, model_dir, loaded_as)

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
            chat_template=ev.chat_template,
            custom=custom_tasks(config) if suite == CUSTOM else None,
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


JOINT = "joint"  # a jointly fused model evaluated beside a pairwise fusion


def comparison_roles(results: Results, sources: list[str]) -> tuple[list[str], str | None]:
    """The pairwise models (`pair-<source>`, in the sources' order) and the joint model that the
    results hold: they stand beside the fused model in the comparison."""
    pairs = [f"pair-{s}" for s in sources if f"pair-{s}" in results]
    pairs += sorted(label for label in results if label.startswith("pair-") and label not in pairs)
    return pairs, (JOINT if JOINT in results else None)


def compare_key(results: Results, fused: str, baseline: str, sources: list[str]) -> str:
    pairs, joint = comparison_roles(results, sources)
    roles = {"fused": fused, "baseline": baseline, "sources": sources}
    if pairs or joint:
        roles.update(pairs=pairs, joint=joint)
    return stage_key(
        "compare",
        results={label: {s: a.key for s, a in suites.items()} for label, suites in results.items()},
        roles=roles,
    )


def compare_unit(
    results: Results, fused: str, baseline: str, sources: list[str], workdir: Path
) -> Unit:
    """The fused vs sources vs CLM baseline table (markdown) and chart (PNG); the pairwise
    models (`pair-<source>`) and a joint model beside the fused one when the results hold them."""
    from fusellm.evaluate import SuiteResult, compare

    pairs, joint = comparison_roles(results, sources)

    def build(folder: Path) -> dict:
        loaded = {
            label: {
                suite: SuiteResult.load(a.path / "result" / "results.json")
                for suite, a in suites.items()
            }
            for label, suites in results.items()
        }
        compare(loaded, fused, baseline, sources, folder, pairs=pairs, joint=joint)
        return {
            "fused": fused,
            "baseline": baseline,
            "sources": sources,
            "pairs": pairs,
            "joint": joint,
        }

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
