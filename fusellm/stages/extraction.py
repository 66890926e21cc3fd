"""Top-k extraction, one unit of work per model x shard, and the merge into one store per model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.sources import write_json_atomic
from fusellm.stages.base import (
    Artifact,
    ModelFiles,
    StageError,
    build_stage,
    device_for,
    stage_key,
    tokenizer_of,
)
from fusellm.stages.prepare import read_pieces


def extract_key(model: ModelFiles, pieces: Artifact, shard: int, config: FusionConfig) -> str:
    e = config.extraction
    return stage_key(
        "extract",
        model=model.identity,
        pieces=pieces.key,
        shard=shard,
        top_k=e.top_k,
        shard_size=e.shard_size,
        token_ce=e.token_ce,
        max_length=config.pieces.block_size,
    )


def extract_shard(
    model: ModelFiles,
    pieces: Artifact,
    shard: int,
    config: FusionConfig,
    workdir: Path,
    *,
    progress: bool = True,
) -> Artifact:
    """Top-k distributions of one model over one shard of the pieces (one unit of parallel work)."""
    from fusellm.extract import extract_topk
    from fusellm.sources import load_model

    e = config.extraction

    def build(folder: Path) -> dict:
        texts = read_pieces(pieces)[shard * e.shard_size : (shard + 1) * e.shard_size]
        if not texts:
            raise StageError(f"shard {shard} of {pieces.path} is empty")
        lm = load_model(model.path, model.ref).to(device_for(e.device))
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
        )
        return {
            "model": model.name,
            "shard": shard,
            "count": manifest["count"],
            "tokens": manifest["tokens"],
            "bytes": manifest["bytes"],
        }

    return build_stage(workdir, "extract", extract_key(model, pieces, shard, config), build)


def merge_stores(shards: list[Artifact], pieces: Artifact, workdir: Path) -> Artifact:
    """One store over all pieces from per-shard stores: shard files are hard-linked, not copied."""
    from fusellm.store import MANIFEST, open_topk

    def build(folder: Path) -> dict:
        stores = [open_topk(s.path / "store", verify=False) for s in shards]
        first = stores[0].manifest
        merged = {k: v for k, v in first.items() if k not in ("shards", "meta")}
        merged.update(
            meta={**first["meta"], "texts_sha256": pieces.info["texts_sha256"]},
            shards=[],
            count=0,
            tokens=0,
            bytes=0,
            complete=True,
        )
        out = folder / "store"
        out.mkdir(exist_ok=True)
        for index, store in enumerate(stores):
            m = store.manifest
            for key in ("top_k", "vocab_size", "format", "version"):
                if m[key] != first[key]:
                    raise StageError(f"{store.dir}: {key}={m[key]!r} differs from {first[key]!r}")
            for key in ("model_fingerprint", "tokenizer_fingerprint"):
                if m["meta"].get(key) != first["meta"].get(key):
                    raise StageError(f"{store.dir}: made by another model ({key} differs)")
            (entry,) = m["shards"]
            name = f"shard-{index:05d}.safetensors"
            target = out / name
            target.unlink(missing_ok=True)
            try:
                os.link(store.dir / entry["file"], target)
            except OSError:
                shutil.copy2(store.dir / entry["file"], target)
            merged["shards"].append(
                {**entry, "index": index, "file": name, "first": merged["count"]}
            )
            for key in ("count", "tokens", "bytes"):
                merged[key] += entry[key]
        if merged["count"] != pieces.info["pieces"]:
            raise StageError(
                f"merged store has {merged['count']} records for {pieces.info['pieces']} pieces"
            )
        write_json_atomic(out / MANIFEST, merged)
        return {"count": merged["count"], "tokens": merged["tokens"], "bytes": merged["bytes"]}

    key = stage_key("store", shards=[s.key for s in shards], pieces=pieces.key)
    return build_stage(workdir, "store", key, build)
