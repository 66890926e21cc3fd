"""Continual training of the target: the fused model and the CLM baseline."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.stages import versions
from fusellm.stages.base import (
    STAGE_FILE,
    Artifact,
    ModelFiles,
    StageError,
    Unit,
    stage_key,
    stage_path,
)

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
TRAININGS = ("fused", "baseline")  # what `train_node` and the pipeline call the two trainings
# The address the other machines reach this one by, where its host name does not resolve
# there (a container's); torchrun's `--local-addr`.
NODE_ADDRESS_VARIABLE = "FUSELLM_NODE_ADDRESS"


def training_config(config: FusionConfig, *, baseline: bool = False, pair: str | None = None):
    """The fused run checks the data covers every source (a pairwise run: its one source); the
    baseline is the same with lam = 1."""
    if baseline:
        update = {"lam": 1.0, "sources": None}
    else:
        update = {"sources": [pair] if pair else config.source_names}
    return config.training.model_copy(update=update)


def train_key(
    target: ModelFiles,
    data: Artifact,
    pieces: Artifact,
    config: FusionConfig,
    *,
    baseline: bool = False,
    pair: str | None = None,
) -> str:
    """The fused model depends on the fused store; the baseline only on the target's token ids.

    The baseline (lam = 1) reads the target's own extraction store, but only its token ids
    count, and those follow from the pieces, the target's tokenizer and the extraction code
    (the target's identity holds its document frame): a new top-k or a changed source never
    retrains it.
    """
    ignored = SCHEDULING_FIELDS | (FUSION_ONLY_FIELDS if baseline else set())
    training = training_config(config, baseline=baseline, pair=pair).model_dump(
        mode="json", exclude=ignored
    )
    if baseline:
        inputs = {"pieces": pieces.key, "tokenizer": target.tokenizer}
        inputs["extract_version"] = versions.version("extract")
    else:
        inputs = {"fused": data.key}
    return stage_key("train", target=target.identity, data=inputs, training=training)


def _run_node(
    training,
    target: ModelFiles,
    data: Artifact,
    folder: Path,
    key: str,
    node_rank: int,
    local_addr: str | None,
    host: bool | None,
):
    """This machine's part of a training across `training.nodes` machines (every GPU of each),
    in `folder`, the stage's partial folder that all of them share; the rendezvous id is the
    stage key. `host`: whether this machine hosts the rendezvous (None: the one the endpoint
    names does)."""
    from fusellm.stages.devices import gpu_count
    from fusellm.train.nodes import run_node

    return run_node(
        training,
        target.path,
        data.path / "store",
        folder,
        node_rank=node_rank,
        run_id=key,
        processes=max(gpu_count(), 1),
        local_addr=local_addr or os.environ.get(NODE_ADDRESS_VARIABLE) or None,
        host=host,
    )


def train_unit(
    target: ModelFiles,
    data: Artifact,
    pieces: Artifact,
    config: FusionConfig,
    *,
    baseline: bool = False,
    pair: str | None = None,
    local_addr: str | None = None,
    host: bool | None = None,
) -> Unit:
    """Continual training of the target: fused objective, or plain CLM (lam = 1) for the baseline.

    `pair`: with `fusion.mode: pairwise`, the one source whose pairwise fused data `data` is.

    `data`: the fused store, or for the baseline the target's own extraction store. With several
    GPUs, the training runs under the DeepSpeed launcher, one process per GPU
    (`fusellm.train.launch`). With `training.nodes` > 1 this machine is node 0 of a training
    across machines (`fusellm.train.nodes`): it hosts the rendezvous and waits there for the
    other nodes (`join_training`, or `train_node`) before the training starts; the folder is
    built, as always, by whoever holds the key's lock.
    """
    from fusellm.stages.devices import gpu_count
    from fusellm.train import train
    from fusellm.train.launch import launch, processes_for

    training = training_config(config, baseline=baseline, pair=pair)
    key = train_key(target, data, pieces, config, baseline=baseline, pair=pair)

    def build(folder: Path) -> dict:
        processes = processes_for(gpu_count())
        if training.nodes > 1:  # one process group over several machines, node 0 here
            result = _run_node(training, target, data, folder, key, 0, local_addr, host)
        elif processes > 1:  # every GPU of the machine, one process each
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

    name = "baseline" if baseline else f"pair-{pair}" if pair else "fused"
    inputs = (pieces.key,) if baseline else (data.key,)
    spec = {"model": name, "lam": training.lam}
    return Unit("train", key, f"train-{name}", config.workdir, build, inputs=inputs, spec=spec)


def join_training(
    target: ModelFiles,
    data: Artifact,
    pieces: Artifact,
    config: FusionConfig,
    *,
    baseline: bool = False,
    node_rank: int,
    local_addr: str | None = None,
    host: bool | None = None,
) -> Path:
    """Node `node_rank` (not 0) of a training across `training.nodes` machines.

    Trains alongside node 0, which builds the stage folder (`train_unit`): its ranks work in
    the stage's partial folder (they write their part of each checkpoint there, and the model if
    global rank 0 lands on this machine) and take no lock; node 0 finishes the folder. Returns
    the stage folder, finished or about to be. Nothing runs when it is finished already.
    """
    if node_rank < 1:
        raise StageError(f"node_rank: {node_rank}; node 0 builds the stage (train_unit)")
    training = training_config(config, baseline=baseline)
    key = train_key(target, data, pieces, config, baseline=baseline)
    final = stage_path(config.workdir, "train", key)
    if (final / STAGE_FILE).is_file():
        return final
    partial = final.with_name(f".{key}.partial")  # build_stage's: where node 0 trains too
    partial.mkdir(parents=True, exist_ok=True)
    _run_node(training, target, data, partial, key, node_rank, local_addr, host)
    return final


def check_train_node(config: FusionConfig, label: str, node_rank: int) -> None:
    """A training and a node that this config has; errors name the argument at fault."""
    if label not in TRAININGS:
        raise StageError(f"label: {label!r} names no training; expected one of {TRAININGS}")
    if label == "baseline" and not config.evaluation.baseline:
        raise StageError(
            "label: 'baseline': evaluation.baseline is false, so this fusion trains no baseline"
        )
    nodes = config.training.nodes
    if not 0 <= node_rank < nodes:
        raise StageError(
            f"node_rank: {node_rank} is not a node of training.nodes = {nodes} "
            f"(expected 0 to {nodes - 1})"
        )


def train_node(
    f, ex, label: str, node_rank: int, *, local_addr: str | None = None, host: bool | None = None
) -> dict:
    """Machine `node_rank`'s part of training `label` (fused or baseline) across nodes.

    `f`, `ex`: the pipeline walked up to align_fuse (`pipeline.walk(..., until="align_fuse")`)
    and its executor. Node 0 builds the stage folder through `ex`, as the train stage does (and
    finds it finished, if it is); the other nodes join it (`join_training`, as a step of `ex`).
    Every node of one training must be started together: each waits for all of them in the
    rendezvous for `training.rendezvous_timeout` seconds. `local_addr`, `host`: as for
    `fusellm.train.nodes.run_node`.
    """
    config = f.config
    check_train_node(config, label, node_rank)
    baseline = label == "baseline"
    data = f.stores[f.target.identity] if baseline else f.fused_data
    out = {"label": label, "node_rank": node_rank, "nodes": config.training.nodes}
    if node_rank == 0:
        unit = train_unit(
            f.target, data, f.pieces, config, baseline=baseline, local_addr=local_addr, host=host
        )
        artifact = ex.run(unit)
        return {**out, "key": artifact.key, "model": str(artifact.path / "model")}
    join = functools.partial(
        join_training,
        baseline=baseline,
        node_rank=node_rank,
        local_addr=local_addr,
        host=host,
    )
    folder = ex.call(f"train-{label}-node-{node_rank}", join, f.target, data, f.pieces, config)
    return {**out, "key": folder.name, "model": None}
