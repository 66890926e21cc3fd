"""One flow per stage, each deployable to its own work pool (a GPU pool for extraction and
training). A stage flow takes the same `FusionConfig` as `fuse` and walks the stages before it
too: their folders exist when already done (``Cached``), so a stage can be (re)run on its own.
"""

from __future__ import annotations

from prefect import flow, runtime

from fusellm.config import FusionConfig
from fusellm.settings import apply_tracking_defaults
from fusellm.stages import pipeline, training
from fusellm.tracking.orphans import set_orchestrator_run
from fusellm_tasks.stages import PrefectExecutor

# The four flows below share their shape on purpose: each must be its own decorated function so
# that Prefect shows its name, docstring and typed form; they differ only in the stage they stop
# after and what they return.


def _walk(config: FusionConfig, until: str) -> tuple[pipeline.Fusion, dict]:
    apply_tracking_defaults()  # the project's MLflow store wherever the flow runs
    set_orchestrator_run(runtime.flow_run.id)  # its stage runs say which flow run owns them
    ex = PrefectExecutor()
    done = pipeline.walk(config, ex, until=until)
    return done, ex.tally.as_dict()


@flow(name="prepare")
def prepare(config: FusionConfig) -> dict:
    """Resolve and fetch the models, cut the corpus into pieces."""
    done, states = _walk(config, "prepare")
    return {"pieces": str(done.pieces.path), "states": states}


@flow(name="extract")
def extract(config: FusionConfig) -> dict:
    """Top-k distributions of every model over the pieces (one task per model x shard)."""
    done, states = _walk(config, "extract")
    return {"stores": {k: str(v.path) for k, v in done.stores.items()}, "states": states}


@flow(name="align-fuse")
def align_fuse(config: FusionConfig) -> dict:
    """Vocabulary maps and the aligned, fused training data (pairwise: one per source)."""
    done, states = _walk(config, "align_fuse")
    if config.fusion.mode == "pairwise":
        return {"pairs": {k: str(v.path) for k, v in done.pairs.items()}, "states": states}
    return {"fused_data": str(done.fused_data.path), "states": states}


@flow(name="train")
def train(config: FusionConfig) -> dict:
    """Training of the fused model and the CLM baseline (pairwise: a model per source, then
    their merge, the fused model)."""
    done, states = _walk(config, "train")
    return {"models": {k: str(v.path / "model") for k, v in done.trained.items()}, "states": states}


@flow(name="train-node")
def train_node(config: FusionConfig, label: str = "fused", node_rank: int = 0) -> dict:
    """One machine of a training across `training.nodes` machines (`label`: fused or baseline).

    Start `training.nodes` runs of this flow together, `node_rank` 0 to N-1, each on a GPU
    machine: node 0 runs where `training.rendezvous` points, hosts the rendezvous and builds
    the stage folder; the others join it. Each walks the stages before training first (done).
    """
    training.check_train_node(config, label, node_rank)  # before anything is walked
    apply_tracking_defaults()
    set_orchestrator_run(runtime.flow_run.id)
    ex = PrefectExecutor()
    done = pipeline.walk(config, ex, until="align_fuse")
    return {**training.train_node(done, ex, label, node_rank), "states": ex.tally.as_dict()}
