"""`execution: deployments`: the heavy stages as runs of their own deployments, fanned out.

The `fuse` flow runs `prepare` on its pool, then extraction as parts of (model, group of
shards), one run of the `extract-part` deployment each, all at once: any worker of the GPU pool
takes the next part, so W GPU workers extract W parts side by side. Then `align-fuse` (CPU pool),
the trainings as `train-part` runs side by side (the fused model or, pairwise, one per pair, and
the CLM baseline; with `training.nodes` N > 1: N `train-node` runs per training, one per
machine, together), then, pairwise, `train` (GPU pool), which finds them done and merges, then evaluation as one `evaluate-part` run per (model,
suite) on the GPU pool. Every part writes its stage folders into the shared work folder; `fuse`
then walks every stage itself, finds them done, and compares and registers. All these runs
appear as children of the `fuse` run in the Prefect UI.

A part whose worker is lost mid-run (the machine gone, the worker killed) ends ``Crashed``:
Prefect marks a run crashed when its heartbeats stop (the automation `fusellm pools` installs,
`fusellm_flows.pools.ensure_crash_detection`). Its part is started again, up to
`part_attempts` times, by whichever worker is free; it resumes from the partial folder its
lost run left, under the unit's lock, so the result equals an uninterrupted run's. Parts that
are already done are not started at all: nothing is computed twice when all goes well.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prefect import get_run_logger
from prefect.deployments import run_deployment

from fusellm.config import FusionConfig
from fusellm.stages import pipeline

EXTRACT_PART = "extract-part/extract-part"
EVALUATE_PART = "evaluate-part/evaluate-part"
TRAIN_NODE = "train-node/train-node"
TRAIN_PART = "train-part/train-part"
POLL_S = 3.0  # how often the states of the parts in flight are read


class StageRunFailed(RuntimeError):
    """A stage deployment's run did not complete: says which, and how it ended."""


def _ended(run) -> str:
    state = run.state
    return f"{state.name}: {state.message or ''}".strip() if state else "without a state"


def run_stage(name: str, parameters: dict) -> str:
    """One run of the stage deployment `name`, to completion; its flow-run id."""
    get_run_logger().info("stage %s: starting a run of deployment %s/%s", name, name, name)
    run = run_deployment(f"{name}/{name}", parameters=parameters, timeout=None)
    if run.state is None or not run.state.is_completed():
        raise StageRunFailed(
            f"stage {name}: flow run {run.name} of deployment {name}/{name} ended {_ended(run)}"
        )
    return str(run.id)


# ---------------------------------------------------------------------------------------------
# Parts


def extraction_parts(config: FusionConfig) -> list[dict]:
    """The extraction still to do, as parts: {"model": name, "shards": [...]}, at most
    `extraction.shards_per_part` shards each (the pieces must exist)."""
    per_model: dict[str, list[int]] = {}
    for unit in pipeline.plan(config, until="extract").pending():
        if unit.stage == "extract":
            if unit.spec["shard"] is None:
                raise StageRunFailed(
                    f"extraction parts: the pieces in {config.workdir} are not cut yet"
                )
            per_model.setdefault(unit.spec["model"], []).append(unit.spec["shard"])
    size = config.extraction.shards_per_part
    return [
        {"model": model, "shards": shards[i : i + size]}
        for model, shards in per_model.items()
        for i in range(0, len(shards), size)
    ]


def training_parts(config: FusionConfig) -> list[dict]:
    """The trainings still to do: {"model": "fused" | "baseline" | "pair-<source>"} each
    (the fused data must exist)."""
    return [
        {"model": unit.spec["model"]}
        for unit in pipeline.plan(config, until="train").pending()
        if unit.stage == "train"
    ]


def evaluation_parts(config: FusionConfig) -> list[dict]:
    """The evaluation still to do: {"model": label, "suite": suite} per unit (models trained)."""
    return [
        dict(unit.spec)
        for unit in pipeline.plan(config, until="evaluate").pending()
        if unit.stage == "evaluate"
    ]


@dataclass
class Part:
    """One part and the flow runs started for it (the last one is the one in flight)."""

    parameters: dict
    runs: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.parameters.items() if k != "config")


def _start(deployment: str, part: Part):
    run = run_deployment(deployment, parameters=part.parameters, timeout=0)
    part.runs.append(run)
    return run


def run_parts(deployment: str, config: FusionConfig, parts: list[dict]) -> list[Part]:
    """Start one run of `deployment` per part, all at once; wait for all. A part whose run
    crashed starts again (up to `part_attempts` runs); one that failed or was cancelled
    fails the stage once the others are done."""
    from prefect.client.orchestration import get_client

    log = get_run_logger()
    config_json = config.model_dump(mode="json")
    todo = [Part({"config": config_json, **p}) for p in parts]
    log.info("%s: %d parts", deployment, len(todo))
    for part in todo:
        _start(deployment, part)
    open_parts, failed = list(todo), []
    with get_client(sync_client=True) as client:
        while open_parts:
            time.sleep(POLL_S)
            for part in list(open_parts):
                run = client.read_flow_run(part.runs[-1].id)
                if run.state is None or not run.state.is_final():
                    continue
                part.runs[-1] = run
                if run.state.is_crashed() and len(part.runs) < config.part_attempts:
                    log.warning(
                        "%s (%s): run %s crashed (%s); starting it again, attempt %d of %d",
                        deployment, part.label, run.name, _ended(run),
                        len(part.runs) + 1, config.part_attempts,
                    )  # fmt: skip
                    _start(deployment, part)
                    continue
                open_parts.remove(part)
                if not run.state.is_completed():
                    failed.append(part)
    if failed:
        lines = [f"{p.label}: run {p.runs[-1].name} ended {_ended(p.runs[-1])}" for p in failed]
        raise StageRunFailed(
            f"{deployment}: {len(failed)} of {len(todo)} parts did not complete:\n  "
            + "\n  ".join(lines)
        )
    return todo


def training_nodes(config: FusionConfig) -> list[list[dict]]:
    """Per training across `training.nodes` machines (the fused model, then the baseline):
    one `train-node` part per node, all started together (they meet in the rendezvous)."""
    labels = ["fused", "baseline"] if config.evaluation.baseline else ["fused"]
    return [
        [{"label": label, "node_rank": rank} for rank in range(config.training.nodes)]
        for label in labels
    ]


def run_stage_deployments(config: FusionConfig) -> list[str]:
    """prepare, the extraction parts, align-fuse, train: each to completion; their run ids.

    With `training.nodes` > 1 each training is N `train-node` runs at once, one per machine of
    the GPU pool (a node lost mid-run crashes its run, which starts again and rejoins)."""
    parameters = {"config": config.model_dump(mode="json")}
    ids = [run_stage("prepare", parameters)]
    parts = run_parts(EXTRACT_PART, config, extraction_parts(config))
    ids += [str(r.id) for p in parts for r in p.runs]
    ids.append(run_stage("align-fuse", parameters))
    if config.training.nodes == 1:  # the trainings side by side, one GPU worker each
        parts = run_parts(TRAIN_PART, config, training_parts(config))
        ids += [str(r.id) for p in parts for r in p.runs]
    else:
        for nodes in training_nodes(config):
            ids += [str(r.id) for p in run_parts(TRAIN_NODE, config, nodes) for r in p.runs]
    if config.fusion.mode == "pairwise":  # the trainings are done: the merge, on a GPU worker
        ids.append(run_stage("train", parameters))
    return ids


def run_evaluation_parts(config: FusionConfig) -> list[str]:
    """Every (model, suite) evaluation still to do, as parts on the GPU pool; their run ids."""
    parts = run_parts(EVALUATE_PART, config, evaluation_parts(config))
    return [str(r.id) for p in parts for r in p.runs]
