"""Continual training of the target: the fused model and the CLM baseline."""

from __future__ import annotations

import shutil
from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.stages import versions
from fusellm.stages.base import Artifact, ModelFiles, Unit, stage_key

# How training is carried out, not what it computes: with exact resume and the same global
# batch these change the weights by float rounding at most, so they are not in the key.
SCHEDULING_FIELDS = {
    "checkpoint_every",
    "keep_checkpoints",
    "micro_batch",
    "zero_stage",
    "gradient_checkpointing",
    "nodes",  # N machines of G GPUs train as one machine of N x G
    "rendezvous",
    "rendezvous_timeout",
}
FUSION_ONLY_FIELDS = {"temperature", "rest_bucket"}  # no fusion term at lam = 1


def training_config(config: FusionConfig, *, baseline: bool = False):
    """The fused run checks the data covers every source; the baseline is the same with lam = 1."""
    update = {"lam": 1.0, "sources": None} if baseline else {"sources": config.source_names}
    return config.training.model_copy(update=update)


def train_key(
    target: ModelFiles,
    data: Artifact,
    pieces: Artifact,
    config: FusionConfig,
    *,
    baseline: bool = False,
) -> str:
    """The fused model depends on the fused store; the baseline only on the target's token ids.

    The baseline (lam = 1) reads the target's own extraction store, but only its token ids
    count, and those follow from the pieces, the target's tokenizer and the extraction code
    (the target's identity holds its document frame): a new top-k or a changed source never
    retrains it.
    """
    ignored = SCHEDULING_FIELDS | (FUSION_ONLY_FIELDS if baseline else set())
    training = training_config(config, baseline=baseline).model_dump(mode="json", exclude=ignored)
    if baseline:
        inputs = {"pieces": pieces.key, "tokenizer": target.tokenizer}
        inputs["extract_version"] = versions.version("extract")
    else:
        inputs = {"fused": data.key}
    return stage_key("train", target=target.identity, data=inputs, training=training)


def train_unit(
    target: ModelFiles,
    data: Artifact,
    pieces: Artifact,
    config: FusionConfig,
    *,
    baseline: bool = False,
) -> Unit:
    """Continual training of the target: fused objective, or plain CLM (lam = 1) for the baseline.

    `data`: the fused store, or for the baseline the target's own extraction store. With several
    GPUs, the training runs under the DeepSpeed launcher, one process per GPU
    (`fusellm.train.launch`).
    """
    from fusellm.stages.devices import gpu_count
    from fusellm.train import train
    from fusellm.train.launch import launch, processes_for

    training = training_config(config, baseline=baseline)

    def build(folder: Path) -> dict:
        processes = processes_for(gpu_count())
        if processes > 1:  # every GPU of the machine, one process each
            result = launch(training, target.path, data.path / "store", folder, processes=processes)
        else:
            result = train(training, target.path, data.path / "store", folder)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the model is saved apart
        return {
            "steps": result.steps,
            "losses": result.losses,
            "tokens": result.tokens,
            "lam": training.lam,
        }

    key = train_key(target, data, pieces, config, baseline=baseline)
    label = "train-baseline" if baseline else "train-fused"
    inputs = (pieces.key,) if baseline else (data.key,)
    return Unit("train", key, label, config.workdir, build, inputs=inputs)
