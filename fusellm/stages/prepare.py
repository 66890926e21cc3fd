"""Resolve and fetch the models, cut the corpus into pieces every tokenizer fits."""

from __future__ import annotations

import json
from pathlib import Path

from fusellm.config import ExtractionConfig, FusionConfig
from fusellm.io.fingerprint import sha256_texts, tokenizer_fingerprint
from fusellm.io.sources import ModelRef
from fusellm.stages.base import Artifact, ModelFiles, StageError, Unit, stage_key, tokenizer_of

PIECES_FILE = "pieces.jsonl"


def resolve_identities(config: FusionConfig) -> dict[str, str]:
    """Current content identities of the target, every source and the corpus (no downloads)."""
    from fusellm.io.corpus import corpus_fingerprint
    from fusellm.io.sources import resolve

    out = {"target": resolve(config.target).identity}
    for name, ref in zip(config.source_names, config.sources):
        out[f"source:{name}"] = resolve(ref).identity
    out["corpus"] = corpus_fingerprint(config.corpus)
    return out


def fetch_model(name: str, ref: ModelRef, identity: str, workdir: Path) -> ModelFiles:
    """Bring a model's files into the local cache and fingerprint its tokenizer."""
    from fusellm.io.sources import fetch, load_tokenizer

    path = Path(fetch(ref, Path(workdir) / "cache"))
    tokenizer = load_tokenizer(path, ref)
    loaded = f"{identity}:{ref.dtype}:{ref.trust_remote_code}"
    return ModelFiles(name, ref, path, loaded, tokenizer_fingerprint(tokenizer))


def pieces_key(config: FusionConfig, models: list[ModelFiles], corpus_identity: str) -> str:
    """Pieces depend on the corpus, the tokenizers (not the weights) and how texts are cut."""
    return stage_key(
        "pieces",
        corpus=corpus_identity,
        tokenizers=sorted({m.tokenizer for m in models}),
        pieces=config.pieces.model_dump(),
    )


def pieces_unit(
    config: FusionConfig,
    models: list[ModelFiles],
    corpus_identity: str,
    *,
    progress: bool = True,
) -> Unit:
    """Cut the corpus into pieces every model's tokenizer fits in the block (docs/design.md)."""
    from fusellm.io.corpus import check_corpus, iter_documents
    from fusellm.data.pieces import split_texts

    def build(folder: Path) -> dict:
        cache = Path(config.workdir) / "cache"
        check_corpus(config.corpus, cache)
        tokenizers = [tokenizer_of(m) for m in models]
        result = split_texts(
            iter_documents(config.corpus, cache),
            tokenizers,
            config.pieces.block_size,
            config.pieces.margin,
            progress=progress,
        )
        if not result.pieces:
            raise StageError(f"corpus {config.corpus.uri}: no non-empty documents to fuse on")
        lines = "".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in result.pieces)
        (folder / PIECES_FILE).write_text(lines, encoding="utf-8")
        return {
            "pieces": len(result.pieces),
            "texts": result.texts,
            "dropped_empty": result.dropped_empty,
            "recut": result.recut,
            "texts_sha256": sha256_texts(result.pieces),
        }

    key = pieces_key(config, models, corpus_identity)
    return Unit("pieces", key, "pieces", config.workdir, build)


def read_pieces(pieces: Artifact) -> list[str]:
    path = pieces.path / PIECES_FILE
    if not path.is_file():
        raise StageError(f"{path}: pieces file is missing (was the work folder cleaned?)")
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def shard_count(pieces: Artifact, extraction: ExtractionConfig) -> int | None:
    """Extraction shards over the pieces; None while the pieces are not made (a plan)."""
    if not pieces.done:
        return None
    return -(-int(pieces.info["pieces"]) // extraction.shard_size)
