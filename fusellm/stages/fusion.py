"""Vocabulary maps per source and the aligned, fused training store."""

from __future__ import annotations

from pathlib import Path

from fusellm.config import FusionOptions
from fusellm.io.sources import write_json_atomic
from fusellm.stages.base import Artifact, ModelFiles, build_stage, stage_key, tokenizer_of
from fusellm.stages.prepare import read_pieces


def vocab_map(
    source: ModelFiles, target: ModelFiles, workdir: Path, *, progress: bool = True
) -> Artifact:
    """The source -> target vocabulary map (MinED) and its statistics."""
    from fusellm.method.vocab import build_vocab_map

    def build(folder: Path) -> dict:
        vmap = build_vocab_map(tokenizer_of(source), tokenizer_of(target), progress=progress)
        vmap.save(folder / "vocab_map.npz")
        stats = vmap.stats()
        write_json_atomic(folder / "stats.json", stats)
        return stats

    key = stage_key("vocab", source=source.tokenizer, target=target.tokenizer)
    return build_stage(workdir, "vocab", key, build)


def fuse_data(
    pieces: Artifact,
    target: ModelFiles,
    target_store: Artifact,
    sources: list[tuple[ModelFiles, Artifact, Artifact]],
    options: FusionOptions,
    workdir: Path,
    *,
    alignment: str = "offsets",
    progress: bool = True,
) -> Artifact:
    """Align every source to the target and fuse the distributions into the training store.

    `sources`: (model, merged store, vocabulary map) per source.
    """
    from fusellm.data.fused_data import SourceData, build_fused_store
    from fusellm.data.store import open_topk
    from fusellm.method.vocab import VocabMap

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
            alignment=alignment,
            shard_size=options.shard_size,
            progress=progress,
        )
        return {
            "sources_stats": manifest["sources_stats"],
            "count": manifest["count"],
            "tokens": manifest["tokens"],
            "bytes": manifest["bytes"],
        }

    key = stage_key(
        "fuse",
        pieces=pieces.key,
        target=target_store.key,
        options=options.model_dump(),
        alignment=alignment,
        sources=[[m.name, s.key, v.key] for m, s, v in sources],
    )
    return build_stage(workdir, "fuse", key, build)
