"""Top-k extraction, one unit of work per model x shard, and the merge into one store per model."""

from __future__ import annotations

from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.stages.base import (
    Artifact,
    ModelFiles,
    StageError,
    Unit,
    frame_of,
    stage_key,
    tokenizer_of,
)
from fusellm.stages.prepare import read_shard


def extract_key(
    model: ModelFiles, pieces: Artifact, shard: int | None, config: FusionConfig
) -> str:
    """What decides a shard's top-k: the model, the pieces, which shard, and what is kept.

    Not the batch size or the device: they change the numbers only by float rounding, and a
    new batch size must not cost a re-extraction.
    """
    e = config.extraction
    return stage_key(
        "extract",
        model=model.identity,
        pieces=pieces.key,
        shard=shard,
        top_k=e.top_k,
        token_ce=e.token_ce,
        max_length=config.pieces.block_size,
    )


def extract_unit(
    model: ModelFiles,
    pieces: Artifact,
    shard: int | None,
    config: FusionConfig,
    *,
    place: int = 0,
    models: int = 1,
    progress: bool = True,
) -> Unit:
    """Top-k distributions of one model over one shard of the pieces (one unit of parallel work).

    `shard` None stands for "every shard" in a plan made before the pieces exist. `place`: the
    model's position among the fusion's `models`, which with the shard decides the GPU
    (`fusellm.stages.devices`: each model on GPUs of its own, one unit per device at a time,
    the model loaded once per device for all of its units there).
    """
    from fusellm.data.extract import extract_topk
    from fusellm.io.sources import load_model
    from fusellm.stages.devices import DEVICES, device_of, gpu_count

    e = config.extraction
    chat = config.corpus.format == "chat"  # conversations: each model's chat template, no frame

    def build(folder: Path) -> dict:
        device = device_of(e.device, place, gpu_count(), models=models, shard=shard or 0)
        with DEVICES.use(
            device, model.identity, lambda: load_model(model.path, model.ref).to(device)
        ) as lm:
            texts = read_shard(pieces, shard)  # this shard's pieces only, once the device is ours
            manifest = extract_topk(
                lm,
                tokenizer_of(model),
                texts,
                folder / "store",
                top_k=e.top_k,
                batch_size=e.batch_size,
                max_length=config.pieces.block_size,
                shard_size=len(texts),
                token_ce=e.token_ce,
                progress=progress,
                frame=None if chat else frame_of(model),
                chat=chat,
            )
        return {
            "model": model.name,
            "shard": shard,
            "device": device,
            "count": manifest["count"],
            "tokens": manifest["tokens"],
            "bytes": manifest["bytes"],
            **({"chat": True} if chat else frame_of(model).describe()),
        }

    label = f"extract-{model.name}-shard-{'all' if shard is None else shard}"
    key = extract_key(model, pieces, shard, config)
    spec = {"model": model.name, "shard": shard}
    return Unit("extract", key, label, config.workdir, build, inputs=(pieces.key,), spec=spec)


def store_key(shards: list[Artifact], pieces: Artifact) -> str:
    return stage_key("store", shards=[s.key for s in shards], pieces=pieces.key)


def store_unit(model: ModelFiles, shards: list[Artifact], pieces: Artifact, workdir: Path) -> Unit:
    """One store over all pieces from per-shard stores: shard files are hard-linked, not copied."""
    from fusellm.data.store import StoreError, concat_stores

    def build(folder: Path) -> dict:
        try:
            merged = concat_stores(
                [s.path / "store" for s in shards],
                folder / "store",
                meta={"texts_sha256": pieces.info["texts_sha256"]},
            )
        except StoreError as err:
            raise StageError(str(err)) from err
        if merged["count"] != pieces.info["pieces"]:
            raise StageError(
                f"merged store has {merged['count']} records for {pieces.info['pieces']} pieces"
            )
        mass = {
            f"topk_mass_{level}": share
            for level, share in (merged.get("topk_mass") or {}).items()
            if level != "positions" and share is not None
        }  # how much of the model's distribution top-k keeps: logged per model, to choose k
        return {
            "count": merged["count"],
            "tokens": merged["tokens"],
            "bytes": merged["bytes"],
            **mass,
        }

    key = store_key(shards, pieces)
    inputs = tuple(s.key for s in shards)
    return Unit("store", key, f"store-{model.name}", workdir, build, inputs=inputs)
