"""Resolve and fetch the models, cut the corpus into pieces every tokenizer fits."""

from __future__ import annotations

from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.io.fingerprint import tokenizer_fingerprint
from fusellm.io.sources import ModelRef
from fusellm.stages.base import (
    Artifact,
    ModelFiles,
    StageError,
    Unit,
    cores,
    stage_key,
    tokenizer_of,
)


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
    if (ref.document_start, ref.document_end) != ("auto", "auto"):  # another frame, another model
        loaded += f":{ref.document_start}:{ref.document_end}"
    return ModelFiles(name, ref, path, loaded, tokenizer_fingerprint(tokenizer))


def pieces_key(config: FusionConfig, models: list[ModelFiles], corpus_identity: str) -> str:
    """Pieces depend on the corpus, the tokenizers (not the weights), how texts are cut, and
    the shard size (extraction and fusion work one pieces shard at a time); not on
    `pieces.workers`, which changes no piece."""
    chat = {}
    if config.corpus.format == "chat":  # whether a conversation fits depends on the templates
        chat["chat_templates"] = sorted({chat_template_sha256(m) for m in models})
    return stage_key(
        "pieces",
        corpus=corpus_identity,
        tokenizers=sorted({m.tokenizer for m in models}),
        pieces=config.pieces.model_dump(exclude={"workers"}),
        shard_size=config.extraction.shard_size,
        **chat,
    )


def chat_template_sha256(model: ModelFiles) -> str:
    """The chat template a model renders conversations with (its own, or the config's)."""
    from fusellm.io.fingerprint import sha256_texts

    return sha256_texts([tokenizer_of(model).chat_template or ""])


def pieces_unit(
    config: FusionConfig,
    models: list[ModelFiles],
    corpus_identity: str,
    *,
    progress: bool = True,
) -> Unit:
    """Cut the corpus into pieces every model's tokenizer fits in the block (docs/design.md).

    Streams: documents are read, cut (in `pieces.workers` processes, default the cores) and
    written one shard at a time, in corpus order.
    """
    from fusellm.data.chat import iter_conversations
    from fusellm.data.piece_shards import write_piece_shards
    from fusellm.data.pieces import PiecesTally, iter_pieces
    from fusellm.io.corpus import check_corpus, iter_documents

    chat = config.corpus.format == "chat"  # a piece is a whole conversation (fusellm.data.chat)

    def build(folder: Path) -> dict:
        cache = Path(config.workdir) / "cache"
        check_corpus(config.corpus, cache)
        distinct = {m.tokenizer: m for m in models}  # the target is often a source too
        tokenizers = [tokenizer_of(m) for m in distinct.values()]
        tally = PiecesTally()
        documents = iter_documents(config.corpus, cache)
        if chat:
            names = [m.name for m in distinct.values()]
            pieces = iter_conversations(
                documents, tokenizers, names, config.pieces.block_size, tally
            )
        else:
            pieces = iter_pieces(
                documents,
                tokenizers,
                config.pieces.block_size,
                config.pieces.margin,
                tally=tally,
                progress=progress,
                workers=config.pieces.workers or cores(),
            )
        manifest = write_piece_shards(pieces, folder, config.extraction.shard_size)
        if not manifest["count"] and chat:
            raise StageError(
                f"corpus {config.corpus.uri}: none of its {tally.texts} conversations fits in "
                f"pieces.block_size = {config.pieces.block_size} tokens with its first reply"
            )
        if not manifest["count"]:
            raise StageError(f"corpus {config.corpus.uri}: no non-empty documents to fuse on")
        counts = (
            {"shortened": tally.shortened, "dropped_long": tally.dropped_long}
            if chat
            else {"dropped_empty": tally.dropped_empty, "recut": tally.recut}
        )
        return {
            "pieces": manifest["count"],
            "shards": len(manifest["shards"]),
            "texts": tally.texts,
            **counts,
            "texts_sha256": manifest["texts_sha256"],
        }

    key = pieces_key(config, models, corpus_identity)
    return Unit("pieces", key, "pieces", config.workdir, build)


def read_shard(pieces: Artifact, shard: int) -> list[str]:
    """The texts of one pieces shard (checked against its checksum); errors name the file."""
    from fusellm.data.piece_shards import PiecesError, read_piece_shard

    try:
        return read_piece_shard(pieces.path, shard)
    except PiecesError as err:
        raise StageError(str(err)) from err  # the cause says which folder is corrupt


def shard_count(pieces: Artifact) -> int | None:
    """Shards of the pieces (extraction and fusion units); None while not made (a plan)."""
    if not pieces.done:
        return None
    return int(pieces.info["shards"])
