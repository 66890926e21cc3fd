"""`execution: deployments`: the heavy stages as runs of their own deployments.

The `fuse` flow runs `prepare`, `extract`, `align-fuse` and `train` (flows/stages.py) one after
the other with `run_deployment`, so that each runs where its deployment's work pool puts it: a
container on a Docker or Kubernetes pool, extraction and training on the GPU pool. Each stage
flow walks the stages before it, which it finds done in the shared work folder; `fuse` then
walks them all itself, finds everything up to training done, and evaluates and registers. The
stage runs appear as children of the `fuse` run in the Prefect UI.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.deployments import run_deployment

from fusellm.config import FusionConfig

STAGE_DEPLOYMENTS = ("prepare", "extract", "align-fuse", "train")  # flow name = deployment name


class StageRunFailed(RuntimeError):
    """A stage deployment's run did not complete: says which, and how it ended."""


def run_stage_deployments(config: FusionConfig) -> list[str]:
    """Run the stage deployments in order, each to completion; returns their flow-run ids."""
    parameters = {"config": config.model_dump(mode="json")}
    ids = []
    for name in STAGE_DEPLOYMENTS:
        get_run_logger().info("stage %s: starting a run of deployment %s/%s", name, name, name)
        run = run_deployment(f"{name}/{name}", parameters=parameters, timeout=None)
        state = run.state
        if state is None or not state.is_completed():
            raise StageRunFailed(
                f"stage {name}: flow run {run.name} of deployment {name}/{name} ended "
                f"{state.name if state else 'without a state'}: {state.message if state else ''}"
            )
        ids.append(str(run.id))
    return ids
