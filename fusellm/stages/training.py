"""Continual training of the target: the fused model and the CLM baseline."""

from __future__ import annotations

import shutil
from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.stages.base import Artifact, ModelFiles, build_stage, stage_key


def training_config(config: FusionConfig, *, baseline: bool = False):
    """The fused run checks the data covers every source; the baseline is the same with lam = 1."""
    update = {"lam": 1.0, "sources": None} if baseline else {"sources": config.source_names}
    return config.training.model_copy(update=update)


def train_key(
    target: ModelFiles, data: Artifact, config: FusionConfig, *, baseline: bool = False
) -> str:
    training = training_config(config, baseline=baseline)
    return stage_key(
        "train", target=target.identity, data=data.key, training=training.model_dump(mode="json")
    )


def train_model(
    target: ModelFiles,
    data: Artifact,
    config: FusionConfig,
    workdir: Path,
    *,
    baseline: bool = False,
) -> Artifact:
    """Continual training of the target: fused objective, or plain CLM (lam = 1) for the baseline.

    The baseline reads the target's own extraction store: with lam = 1 only its token ids count,
    so a changed source never retrains it.
    """
    from fusellm.train import train

    training = training_config(config, baseline=baseline)

    def build(folder: Path) -> dict:
        result = train(training, target.path, data.path / "store", folder)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the model is saved apart
        return {
            "steps": result.steps,
            "losses": result.losses,
            "tokens": result.tokens,
            "lam": training.lam,
        }

    return build_stage(workdir, "train", train_key(target, data, config, baseline=baseline), build)
