"""Vocabulary maps per source and the aligned, fused training store."""

from __future__ import annotations

from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.io.files import write_json_atomic
from fusellm.stages.base import Artifact, ModelFiles, Unit, stage_key, tokenizer_of
from fusellm.stages.prepare import read_pieces


def vocab_key(source: ModelFiles, target: ModelFiles) -> str:
    """A map depends on the two tokenizers only, never on weights."""
    return stage_key("vocab", source=source.tokenizer, target=target.tokenizer)


def vocab_unit(
    source: ModelFiles, target: ModelFiles, config: FusionConfig, *, progress: bool = True
) -> Unit:
    """The source -> target vocabulary map and its statistics."""
    from fusellm.method.vocab import build_vocab_map

    def build(folder: Path) -> dict:
        vmap = build_vocab_map(tokenizer_of(source), tokenizer_of(target), progress=progress)
        vmap.save(folder / "vocab_map.npz")
        stats = vmap.stats()
        write_json_atomic(folder / "stats.json", stats)
        return stats

    key = vocab_key(source, target)
    return Unit("vocab", key, f"vocab-map-{source.name}", config.workdir, build)


SourceInputs = tuple[ModelFiles, Artifact, Artifact]  # (model, merged store, vocabulary map)


def fuse_key(
    pieces: Artifact, target_store: Artifact, sources: list[SourceInputs], config: FusionConfig
) -> str:
    """The fused store depends on every input store and map, the fusion options, the alignment."""
    return stage_key(
        "fuse",
        pieces=pieces.key,
        target=target_store.key,
        options=config.fusion.model_dump(mode="json"),
        alignment=config.alignment.model_dump(mode="json"),
        sources=[[m.name, s.key, v.key] for m, s, v in sources],
    )


def fuse_unit(
    pieces: Artifact,
    target: ModelFiles,
    target_store: Artifact,
    sources: list[SourceInputs],
    config: FusionConfig,
    *,
    progress: bool = True,
) -> Unit:
    """Align every source to the target and fuse the distributions into the training store."""
    from fusellm.data.fused_data import SourceData, build_fused_store
    from fusellm.data.store import open_topk
    from fusellm.method.vocab import VocabMap

    options = config.fusion

    def build(folder: Path) -> dict:
        data = [
            SourceData(
                m.name,
                tokenizer_of(m),
                open_topk(s.path / "store"),
                VocabMap.load(v.path / "vocab_map.npz"),
            )
            for m, s, v in sources
        ]
        manifest = build_fused_store(
            read_pieces(pieces),
            tokenizer_of(target),
            open_topk(target_store.path / "store"),
            data,
            folder / "store",
            method=options.method,
            granularity=options.granularity,
            ce_unit=options.ce_unit,
            alignment=config.alignment.method,
            shard_size=options.shard_size,
            progress=progress,
        )
        return {
            "sources_stats": manifest["sources_stats"],
            "count": manifest["count"],
            "tokens": manifest["tokens"],
            "bytes": manifest["bytes"],
        }

    key = fuse_key(pieces, target_store, sources, config)
    return Unit("fuse", key, "fuse-data", config.workdir, build)
