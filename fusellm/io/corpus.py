"""The fusion corpus: documents from local files, saved or Hub datasets, or S3.

A `CorpusRef` names where the texts are; `iter_documents` yields them as strings, always in the same
order (files sorted by relative path, rows in file order), so pieces and every downstream stage are
reproducible; `check_corpus` finds structural mistakes (missing path, unknown file type, missing
column or split) before any expensive work; `corpus_fingerprint` says cheaply whether it changed.

Formats, by file suffix (a folder may mix them, and nest them):

* ``.txt``: one document per file. Text files usually hold whole documents (a book, an article,
  a source file) whose blank lines are paragraph breaks, not document breaks; splitting there
  would cut context the models should see. Long documents are cut later, by `fusellm.data.pieces`.
* ``.jsonl``: one JSON object per line, the document in ``text_field``; blank lines are skipped.
* ``.parquet``: the ``text_field`` column, read in record batches with pyarrow.
* a folder written by ``datasets.save_to_disk`` (``state.json`` or ``dataset_dict.json`` inside).
* ``hf://datasets/org/name[@revision]``: ``datasets.load_dataset`` with its own cache; offline mode
  (``HF_HUB_OFFLINE``) works from that cache.
* ``s3://bucket/key-or-prefix``: mirrored with `fusellm.io.s3.fetch_s3`, then read as above.

With ``format: chat`` each record is a conversation: ``messages_field`` (default ``messages``)
holds a list of ``{"role", "content"}`` (JSONL, or a Parquet / datasets column of that shape),
and each document is its canonical JSON (`fusellm.data.chat`).

Malformed input is reported with the file, the line or row, and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from fusellm.io.hub import hub_commit, hub_offline
from fusellm.io.s3 import FETCH_STATE, MANIFEST, fetch_s3, list_s3, listing_hash, s3_cache_folder
from fusellm.io.sources import local_identity
from fusellm.io.uris import S3URI, HubURI, LocatedRef, MissingLocalPath, SourceError, parse_uri

SUFFIXES = (".txt", ".jsonl", ".parquet")


class CorpusError(SourceError):
    """The corpus cannot be read; the message names the file, line or row, and field."""


class MissingCorpusPath(CorpusError, MissingLocalPath):
    """The corpus's local path does not exist."""


class CorpusRef(LocatedRef):
    """Where the fusion corpus lives and which field holds the text."""

    hub_kind: ClassVar[str] = "dataset"
    hub_hint: ClassVar[str] = "a Hub corpus is written hf://datasets/org/name"

    text_field: str = "text"
    format: Literal["text", "chat"] = "text"  # chat: conversations in messages_field
    messages_field: str = "messages"
    split: str | None = None  # for datasets with several splits (Hub: default "train")
    limit: int | None = Field(default=None, gt=0)  # first N documents only

    @property
    def field(self) -> str:
        """The field that holds each document: the text, or the conversation's messages."""
        return self.messages_field if self.format == "chat" else self.text_field


def default_cache() -> Path:
    """Where remote corpora are mirrored: FUSELLM_CACHE, else ~/.cache/fusellm."""
    return Path(os.environ.get("FUSELLM_CACHE") or Path.home() / ".cache" / "fusellm")


# ---------------------------------------------------------------------------------------------
# Documents


def iter_documents(ref: CorpusRef, cache_dir: str | Path | None = None) -> Iterator[str]:
    """Documents of the corpus, in a fixed order, at most `ref.limit` of them."""
    for count, doc in enumerate(_documents(ref, cache_dir), start=1):
        yield doc
        if ref.limit is not None and count >= ref.limit:
            return  # before reading further: rows past the limit are never parsed


def _documents(ref: CorpusRef, cache_dir: str | Path | None) -> Iterator[str]:
    uri = parse_uri(ref.uri)
    if isinstance(uri, HubURI):
        yield from read_hub_dataset(uri, ref.field, ref.split, ref.format)
        return
    if isinstance(uri, S3URI):
        path = fetch_s3(
            uri, s3_cache_folder(cache_dir or default_cache(), uri), endpoint_url=ref.endpoint_url
        )
    else:
        path = uri.path
    if not path.exists():
        raise MissingCorpusPath(f"corpus path {path} does not exist")
    yield from read_path(path, ref.field, ref.split, ref.format)


def read_path(
    path: Path, field: str, split: str | None = None, kind: str = "text"
) -> Iterator[str]:
    """Documents of a file or folder (recursively, sorted by relative path)."""
    if path.is_file():
        yield from read_file(path, field, kind)
    elif is_saved_dataset(path):
        yield from read_saved_dataset(path, field, split, kind)
    else:
        for child in _corpus_entries(path):
            yield from read_path(child, field, split, kind)


def _corpus_entries(folder: Path) -> list[Path]:
    """Files and subfolders that belong to the corpus, sorted; unknown file types are errors."""
    entries = []
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
        if child.name.startswith(".") or child.name in (MANIFEST, FETCH_STATE):
            continue
        if child.is_file() and child.suffix not in SUFFIXES:
            raise CorpusError(
                f"corpus file {child} has an unsupported type {child.suffix!r}; expected one of "
                f"{', '.join(SUFFIXES)} or a saved datasets folder"
            )
        entries.append(child)
    return entries


def read_file(path: Path, field: str, kind: str = "text") -> Iterator[str]:
    if path.suffix == ".txt":
        if kind == "chat":
            raise CorpusError(f"{path}: a chat corpus is JSONL or Parquet records, not .txt")
        yield read_txt(path)
    elif path.suffix == ".jsonl":
        yield from read_jsonl(path, field, kind)
    elif path.suffix == ".parquet":
        yield from read_parquet(path, field, kind)
    else:
        raise CorpusError(
            f"corpus file {path} has an unsupported type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}"
        )


def read_txt(path: Path) -> str:
    """The whole file, as one document (strict UTF-8: undecodable bytes are an error)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not UTF-8 at byte {err.start}") from None


def _text_of(record, field: str, where: str, kind: str = "text") -> str:
    if not isinstance(record, dict):
        raise CorpusError(f"{where} is a JSON {type(record).__name__}, expected an object")
    if field not in record:
        fields = ", ".join(sorted(map(str, record))[:10])
        raise CorpusError(f'{where} has no field "{field}" (it has: {fields})')
    return _document(record[field], f'field "{field}"', where, kind)


def _document(value, name: str, where: str, kind: str) -> str:
    """A text, or (chat) a conversation as its canonical JSON; errors name `where` and `name`
    (`field "text"` of a JSON record, `column "text"` of a table)."""
    if kind == "chat":
        from fusellm.data.chat import ChatError, conversation_piece, normalise_messages

        try:
            return conversation_piece(normalise_messages(value, f"{where}, {name}"))
        except ChatError as err:
            raise CorpusError(str(err)) from None
    if not isinstance(value, str):
        raise CorpusError(f"{where}: {name} is {type(value).__name__}, expected a string")
    return value


def read_jsonl(path: Path, field: str, kind: str = "text") -> Iterator[str]:
    """One document per line; a line that is not UTF-8, not JSON, or nested beyond what the
    parser can follow is an error naming the file and the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(f"{where}: not UTF-8 at byte {err.start} of the line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise CorpusError(f"{where}: invalid JSON ({err})") from None
            except RecursionError:
                raise CorpusError(f"{where}: JSON nested too deeply") from None
            yield _text_of(record, field, where, kind)


def read_parquet(path: Path, field: str, kind: str = "text") -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise CorpusError(f"{path}: not a readable Parquet file ({err})") from None
    columns = pf.schema_arrow.names
    if field not in columns:
        raise CorpusError(f'{path} has no column "{field}" (it has: {", ".join(columns[:10])})')
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            yield _document(value, f'column "{field}"', f"{path} row {row}", kind)
            row += 1


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _pick_split(dataset, split: str | None, where: str):
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        return dataset
    splits = sorted(dataset)
    if split is None:
        if len(splits) == 1:
            return dataset[splits[0]]
        raise CorpusError(f"{where} has splits {splits}: set split to one of them")
    if split not in dataset:
        raise CorpusError(f"{where} has no split {split!r} (it has: {splits})")
    return dataset[split]


def _dataset_texts(dataset, field: str, where: str, kind: str = "text") -> Iterator[str]:
    if field not in dataset.column_names:
        raise CorpusError(
            f'{where} has no column "{field}" (it has: {", ".join(dataset.column_names[:10])})'
        )
    row = 0
    for batch in dataset.select_columns([field]).iter(batch_size=1000):
        for value in batch[field]:
            yield _document(value, f'column "{field}"', f"{where} row {row}", kind)
            row += 1


def read_saved_dataset(
    path: Path, field: str, split: str | None = None, kind: str = "text"
) -> Iterator[str]:
    from datasets import load_from_disk

    dataset = _pick_split(load_from_disk(str(path)), split, f"dataset {path}")
    yield from _dataset_texts(dataset, field, f"dataset {path}", kind)


def read_hub_dataset(
    uri: HubURI, field: str, split: str | None = None, kind: str = "text"
) -> Iterator[str]:
    """A Hub dataset through ``datasets.load_dataset`` and its cache (offline: cache only)."""
    import datasets

    where = f"dataset {uri.repo_id}"
    try:
        dataset = datasets.load_dataset(uri.repo_id, revision=uri.revision, split=split or "train")
    except (FileNotFoundError, ConnectionError, OSError) as err:
        if hub_offline():
            raise CorpusError(
                f"{where} (revision {uri.revision}) is not in the Hugging Face datasets cache and "
                "HF_HUB_OFFLINE is set: load it once with network access, or unset HF_HUB_OFFLINE"
            ) from None
        raise CorpusError(f"{where} (revision {uri.revision}) cannot be loaded: {err}") from None
    except ValueError as err:  # e.g. an unknown split
        raise CorpusError(f"{where}: {err}") from None
    yield from _dataset_texts(dataset, field, where, kind)


# ---------------------------------------------------------------------------------------------
# Cheap checks, before any expensive work


def check_corpus(ref: CorpusRef, cache_dir: str | Path | None = None) -> int:
    """Check what can be checked without reading the corpus; returns the number of sources.

    Local and S3 corpora: the path exists, every file has a known type, each Parquet file and
    saved dataset has the text column (and the split), each JSONL file's first record has the
    field. Row-level problems further in are still reported, with their line, when read. Hub
    datasets are checked when loaded (their schema needs the download).
    """
    uri = parse_uri(ref.uri)
    if isinstance(uri, HubURI):
        return 1
    if isinstance(uri, S3URI):
        cache = cache_dir or default_cache()
        path = fetch_s3(uri, s3_cache_folder(cache, uri), endpoint_url=ref.endpoint_url)
    else:
        path = uri.path
    if not path.exists():
        raise MissingCorpusPath(f"corpus path {path} does not exist")
    return _check_path(path, ref.field, ref.split, ref.format)


def _check_path(path: Path, field: str, split: str | None, kind: str) -> int:
    if path.is_dir() and not is_saved_dataset(path):
        return sum(_check_path(child, field, split, kind) for child in _corpus_entries(path))
    if path.suffix == ".jsonl":
        next(read_jsonl(path, field, kind), None)
    elif path.suffix == ".parquet" or is_saved_dataset(path):
        next(read_path(path, field, split, kind), None)
    elif path.suffix != ".txt" or kind == "chat":
        list(read_file(path, field, kind))  # raises the unsupported-type error
    return 1


# ---------------------------------------------------------------------------------------------
# Fingerprint


def corpus_fingerprint(ref: CorpusRef) -> str:
    """A hash that changes iff the documents the ref selects can have changed.

    S3: the (key, ETag, size) listing, no download. Hub: the dataset commit. Local: the full
    content of every file: corpora are edited in place (a fixed line, an appended file) and a
    stale "unchanged" would silently reuse old pieces, so we pay one read of the corpus.
    """
    uri = parse_uri(ref.uri)
    if isinstance(uri, HubURI):
        content = f"hub:{hub_commit(uri)}"
    elif isinstance(uri, S3URI):
        content = f"s3:{listing_hash(list_s3(uri, endpoint_url=ref.endpoint_url))}"
    else:
        if not uri.path.exists():
            raise MissingCorpusPath(f"corpus path {uri.path} does not exist")
        content = f"local:{local_identity(uri.path, small=2**62)}"
    chosen = {
        "content": content,
        "text_field": ref.text_field,
        "split": ref.split,
        "limit": ref.limit,
    }
    if ref.format == "chat":  # other documents from the same files
        chosen.update(format="chat", messages_field=ref.messages_field)
    selection = json.dumps(chosen, sort_keys=True)
    return hashlib.sha256(selection.encode()).hexdigest()
