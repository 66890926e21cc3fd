"""One flow per stage, each deployable to its own work pool (a GPU pool for extraction and
training). A stage flow takes the same `FusionConfig` as `fuse` and runs the stages before it
too: their tasks are cache hits when already done, so a stage can be (re)run on its own.
"""

from __future__ import annotations

from prefect import flow

from fusellm.config import FusionConfig
from flows import steps


@flow(name="prepare")
def prepare(config: FusionConfig) -> dict:
    """Resolve and fetch the models, cut the corpus into pieces."""
    report = steps.Report()
    prepared = steps.prepare(config, report)
    return {"pieces": str(prepared.pieces.path), "states": report.as_dict()}


@flow(name="extract")
def extract(config: FusionConfig) -> dict:
    """Top-k distributions of every model over the pieces (one task per model x shard)."""
    report = steps.Report()
    prepared = steps.prepare(config, report)
    stores = steps.extract(config, prepared, report)
    return {"stores": {k: str(v.path) for k, v in stores.items()}, "states": report.as_dict()}


@flow(name="align-fuse")
def align_fuse(config: FusionConfig) -> dict:
    """Vocabulary maps and the aligned, fused training data."""
    report = steps.Report()
    prepared = steps.prepare(config, report)
    stores = steps.extract(config, prepared, report)
    fused = steps.align_and_fuse(config, prepared, stores, report)
    return {"fused_data": str(fused.path), "states": report.as_dict()}


@flow(name="train")
def train(config: FusionConfig) -> dict:
    """Training of the fused model and the CLM baseline."""
    report = steps.Report()
    prepared = steps.prepare(config, report)
    stores = steps.extract(config, prepared, report)
    fused = steps.align_and_fuse(config, prepared, stores, report)
    trained = steps.train(config, prepared, stores, fused, report)
    return {
        "models": {k: str(v.path / "model") for k, v in trained.items()},
        "states": report.as_dict(),
    }
