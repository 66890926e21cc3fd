"""Vocabulary maps per source, and the aligned, fused training store, one pieces shard at a time.

Align-and-fuse is CPU-bound Python and independent per piece: one unit per pieces shard (each
reads only its shard's pieces and its shard of every extraction store) runs in a pool of worker
processes, then a merge joins the fused shards into one store without copying them.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.io.files import write_json_atomic
from fusellm.stages.base import Artifact, ModelFiles, StageError, Unit, stage_key, tokenizer_of
from fusellm.stages.prepare import read_shard


def vocab_key(source: ModelFiles, target: ModelFiles, config: FusionConfig) -> str:
    """A map depends on the two tokenizers and the map method only, never on weights."""
    method = config.fusion.vocab_map
    return stage_key("vocab", source=source.tokenizer, target=target.tokenizer, method=method)


def vocab_unit(
    source: ModelFiles, target: ModelFiles, config: FusionConfig, *, progress: bool = True
) -> Unit:
    """The source -> target vocabulary map and its statistics."""
    from fusellm.method.vocab import build_vocab_map

    def build(folder: Path) -> dict:
        vmap = build_vocab_map(
            tokenizer_of(source),
            tokenizer_of(target),
            method=config.fusion.vocab_map,
            progress=progress,
        )
        vmap.save(folder / "vocab_map.npz")
        stats = vmap.stats()
        write_json_atomic(folder / "stats.json", stats)
        return stats

    key = vocab_key(source, target, config)
    return Unit("vocab", key, f"vocab-map-{source.name}", config.workdir, build)


SourceInputs = tuple[ModelFiles, Artifact, Artifact]  # (model, extraction shard, vocabulary map)


def fuse_key(
    pieces: Artifact,
    shard: int | None,
    target_shard: Artifact,
    sources: list[SourceInputs],
    config: FusionConfig,
) -> str:
    """A fused shard depends on its input shards and maps, the fusion options, the alignment.

    Not on `fusion.workers`: how many shards are fused at once changes no number.
    """
    return stage_key(
        "fuse",
        pieces=pieces.key,
        shard=shard,
        target=target_shard.key,
        options=config.fusion.model_dump(mode="json", exclude={"workers"}),
        alignment=config.alignment.model_dump(mode="json"),
        sources=[[m.name, s.key, v.key] for m, s, v in sources],
    )


def fuse_unit(
    pieces: Artifact,
    shard: int | None,
    target: ModelFiles,
    target_shard: Artifact,
    sources: list[SourceInputs],
    config: FusionConfig,
) -> Unit:
    """Align every source to the target and fuse the distributions of one pieces shard.

    Runs in a worker process: `build` is a module-level function with picklable arguments.
    `shard` None stands for "every shard" in a plan made before the pieces exist.
    """
    build = partial(_fuse_shard, pieces, shard, target, target_shard, sources, config)
    label = f"fuse-shard-{'all' if shard is None else shard}"
    key = fuse_key(pieces, shard, target_shard, sources, config)
    inputs = (pieces.key, target_shard.key, *[k for _, s, v in sources for k in (s.key, v.key)])
    return Unit("fuse", key, label, config.workdir, build, in_process_pool=True, inputs=inputs)


def _fuse_shard(
    pieces: Artifact,
    shard: int,
    target: ModelFiles,
    target_shard: Artifact,
    sources: list[SourceInputs],
    config: FusionConfig,
    folder: Path,
) -> dict:
    from fusellm.data.fused_data import SourceData, build_fused_store
    from fusellm.data.store import open_topk
    from fusellm.method.vocab import VocabMap

    texts = read_shard(pieces, shard)
    data = [
        SourceData(
            m.name,
            tokenizer_of(m),
            open_topk(s.path / "store"),
            VocabMap.load(v.path / "vocab_map.npz"),
        )
        for m, s, v in sources
    ]
    options = config.fusion
    manifest = build_fused_store(
        texts,
        tokenizer_of(target),
        open_topk(target_shard.path / "store"),
        data,
        folder / "store",
        method=options.method,
        granularity=options.granularity,
        ce_unit=options.ce_unit,
        alignment=config.alignment.method,
        next_token=options.next_token,
        shard_size=len(texts),
        progress=False,  # many shards at once: the executor reports progress per shard
    )
    return {"shard": shard, "count": manifest["count"], "tokens": manifest["tokens"]}


def fused_key(shards: list[Artifact]) -> str:
    return stage_key("fused", shards=[s.key for s in shards])


def fused_unit(
    shards: list[Artifact], maps: list[Artifact], pieces: Artifact, config: FusionConfig
) -> Unit:
    """The fused shards joined into one training store (hard links), with per-source stats.

    `maps`: each source's vocabulary map, in source order (their exact-match rates).
    """
    from fusellm.data.fused_data import summarise_sources
    from fusellm.data.store import StoreError, concat_stores, open_topk

    def build(folder: Path) -> dict:
        stores = [s.path / "store" for s in shards]
        parts = [open_topk(p, verify=False).manifest for p in stores]
        meta = parts[0]["meta"]
        stats = summarise_sources(
            [entry for part in parts for entry in part["shards"]],
            meta["sources"],
            [m.info["exact_rate"] for m in maps],
            meta["granularity"],
            sum(part["count"] for part in parts),
            [name in meta.get("same_as_target", []) for name in meta["sources"]],
        )
        extra = {"texts_sha256": pieces.info["texts_sha256"], "sources_stats": stats}
        try:
            merged = concat_stores(stores, folder / "store", meta=extra)
        except StoreError as err:
            raise StageError(str(err)) from err
        return {
            "sources_stats": stats,
            "count": merged["count"],
            "tokens": merged["tokens"],
            "bytes": merged["bytes"],
        }

    inputs = tuple(s.key for s in shards)
    return Unit("fused", fused_key(shards), "fused-data", config.workdir, build, inputs=inputs)
