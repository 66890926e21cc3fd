"""The units of fan-out work, each a flow that any worker of the GPU pool can take.

With `execution: deployments`, `fuse` cuts extraction into parts of (model, group of shards),
training into its independent trainings and evaluation into (model, suite), and starts one run
of `extract-part`, `train-part` or `evaluate-part` per part (`fusellm_flows.dispatch`). A part
walks the stages before it, which it finds done in the shared work folder, and builds its own
stage folders there: a part's folders are its result. Parts log no MLflow runs of their own;
`fuse` logs the numbers when it walks the finished stages.

A part walks those finished stages in process, without a task run each (`_walk`): they only
read folders `fuse` already built and showed, and a task run each would cost every part
seconds of calls to the server, over hundreds of parts. A part's own units are task runs.
"""

from __future__ import annotations

from prefect import flow

from fusellm.config import FusionConfig
from fusellm.settings import apply_tracking_defaults
from fusellm.stages import pipeline
from fusellm.stages.pipeline import Executor, NullTracker
from fusellm_tasks.stages import PrefectExecutor


def _part_name() -> str:
    from prefect import runtime

    p = runtime.flow_run.parameters
    what = p.get("shards") if "shards" in p else p.get("suite", "train")
    if isinstance(what, list):
        what = "shards-" + "-".join(str(s) for s in what)
    return f"{p.get('model')}-{what}"


def _walk() -> Executor:
    """How a part walks the stages before its own: in this process, logging nowhere."""
    return Executor(NullTracker())


@flow(name="extract-part", flow_run_name=_part_name)
def extract_part(config: FusionConfig, model: str, shards: list[int]) -> dict:
    """Top-k distributions of one model over a group of shards (one unit of extraction)."""
    apply_tracking_defaults()
    ex = PrefectExecutor(NullTracker())
    done = pipeline.extract_part(config, ex, model, shards, before=_walk())
    return {"folders": [str(a.path) for a in done], "states": ex.tally.as_dict()}


@flow(name="evaluate-part", flow_run_name=_part_name)
def evaluate_part(config: FusionConfig, model: str, suite: str) -> dict:
    """One model (fused, baseline or a source) scored on one suite."""
    apply_tracking_defaults()
    ex = PrefectExecutor(NullTracker())
    result = pipeline.evaluate_part(config, ex, model, suite, before=_walk())
    return {"folder": str(result.path), "average": result.info.get("average")}


@flow(name="train-part", flow_run_name=_part_name)
def train_part(config: FusionConfig, model: str) -> dict:
    """One training: the fused model (pairwise: one pair's model) or the CLM baseline."""
    apply_tracking_defaults()
    ex = PrefectExecutor(NullTracker())
    trained = pipeline.train_part(config, ex, model, before=_walk())
    return {"folder": str(trained.path), "steps": trained.info.get("steps")}
