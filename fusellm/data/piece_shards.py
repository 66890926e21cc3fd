"""Pieces on disk in shards, so that each unit of later work reads only its own shard.

At the paper's scale the pieces are ~7 GB of text: a stage that needs shard i must not read or
parse the others, and no stage may hold them all. A pieces folder holds

    pieces.json            format, shard size, counts, and per shard: file, count, sha256,
                           texts_sha256 (the order-sensitive hash of its texts)
    pieces-00000.jsonl     {"text": ...} per line, pieces [0, shard_size)
    pieces-00001.jsonl     ...

Extraction shard i and fusion shard i cover exactly the pieces of pieces shard i. Each file is
written under a temporary name and renamed; its checksum is verified when it is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from fusellm.io.files import CorruptFileError, sha256_file, write_json_atomic, write_text_atomic

MANIFEST = "pieces.json"
FORMAT = "fusellm-pieces-1"


class PiecesError(RuntimeError):
    """A pieces folder is missing, incomplete or corrupt; the message names the file."""


class CorruptPiecesError(PiecesError, CorruptFileError):
    """A pieces file is missing or does not match its manifest."""


def shard_name(index: int) -> str:
    return f"pieces-{index:05d}.jsonl"


def _texts_hasher():
    return hashlib.sha256()


def _add_text(h, text: str) -> None:
    data = text.encode("utf-8")  # the same hash as fusellm.io.fingerprint.sha256_texts
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def write_piece_shards(pieces: Iterable[str], folder: Path, shard_size: int) -> dict:
    """Write a stream of pieces as shards of `shard_size`; returns the manifest.

    Memory holds one shard of text at a time.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    whole = _texts_hasher()
    buffer: list[str] = []

    def flush() -> None:
        name = shard_name(len(shards))
        own = _texts_hasher()
        for text in buffer:
            _add_text(own, text)
            _add_text(whole, text)
        lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in buffer)
        path = write_text_atomic(folder / name, lines)
        shards.append(
            {
                "file": name,
                "count": len(buffer),
                "sha256": sha256_file(path),
                "texts_sha256": own.hexdigest(),
            }
        )
        buffer.clear()

    for piece in pieces:
        buffer.append(piece)
        if len(buffer) >= shard_size:
            flush()
    if buffer:
        flush()
    manifest = {
        "format": FORMAT,
        "shard_size": shard_size,
        "count": sum(s["count"] for s in shards),
        "texts_sha256": whole.hexdigest(),
        "shards": shards,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CorruptPiecesError(
            path, f"{path}: pieces manifest is missing (was the work folder cleaned?)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CorruptPiecesError(path, f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise PiecesError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_piece_shard(folder: Path, index: int) -> list[str]:
    """The pieces of shard `index`, after checking the file against the manifest."""
    manifest = read_manifest(folder)
    shards = manifest["shards"]
    if not 0 <= index < len(shards):
        raise PiecesError(f"{folder}: no shard {index} (it has {len(shards)})")
    entry = shards[index]
    path = Path(folder) / entry["file"]
    if not path.is_file():
        raise CorruptPiecesError(path, f"{path}: pieces shard is missing")
    if sha256_file(path) != entry["sha256"]:
        raise CorruptPiecesError(
            path, f"{path}: checksum mismatch (the file was changed or truncated)"
        )
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    if len(texts) != entry["count"]:
        raise CorruptPiecesError(
            path, f"{path}: {len(texts)} pieces, the manifest says {entry['count']}"
        )
    return texts


def iter_all_pieces(folder: Path) -> Iterator[str]:
    """Every piece in order, one shard in memory at a time."""
    for index in range(len(read_manifest(folder)["shards"])):
        yield from read_piece_shard(folder, index)
