"""Compact, checksummed storage of per-position top-k next-token distributions.

Layout of a store folder:

    manifest.json              format, top-k, vocab size, fingerprints, one entry per shard
    shard-00000.safetensors    records [0, shard_size)
    shard-00001.safetensors    ...

A shard holds, for its records concatenated along the token axis:
    offsets    int64  [n + 1]   record i spans tokens offsets[i]:offsets[i+1]
    input_ids  u16/u32 [T]      the record's token ids
    topk_ids   u16/u32 [T, k]   top-k next-token ids at each position
    topk_codes uint8  [T, k]    probabilities, companded: code = round(255 * p ** (1/3));
                                code 0 = empty slot (read back as id -1, log-prob -inf)
    ce         float32 [n]      mean next-token cross-entropy of each record
    token_ce   float16 [T]      optional: -log p(token t+1) at position t (NaN at the last one)

At k = 10 and a vocabulary below 65,536 that is 2 + 20 + 10 = 32 bytes per token (34 with
per-token CE) against ~100 in the published Arrow lists (fp16 values + int64 ids). The cube-root
code keeps the absolute error on any probability below 0.006 (at p near 1) while small
probabilities keep a relative precision of a few percent; probabilities under 7.5e-9 read back as
empty slots (id -1, log-prob -inf: weight zero in the loss).

Shards are written to a temporary name and renamed; the manifest is rewritten (atomically) after
each shard, so an interrupted writer leaves a valid prefix that a new writer resumes from.
Every shard's sha256 is checked when the shard is first read.

The stored values are the model's real probabilities (log-softmax over its whole output), not
renormalised over the k kept: 1 - sum of a row is the mass the top-k dropped, which the fusion
loss's rest bucket uses (`fusellm.method.loss`). An extraction store's manifest also says how
much of that mass its top-k holds (`topk_mass`, see `topk_mass_summary`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fusellm.io.files import CorruptFileError, sha256_file, write_json_atomic

FORMAT = "fusellm-topk"
VERSION = 1
MANIFEST = "manifest.json"
_CODE_MAX = 255
_POWER = 3.0
MASS_LEVELS = {"ge_50": 0.5, "ge_90": 0.9, "ge_99": 0.99}  # top-k mass shares in the manifest


class StoreError(RuntimeError):
    """A store on disk is missing, incomplete, corrupted or incompatible."""


class CorruptStoreError(StoreError, CorruptFileError):
    """A file of a complete store is missing or does not match its manifest."""


@dataclass
class TopkRecord:
    """One piece's distributions: row t describes the token after position t."""

    input_ids: np.ndarray  # int64 [T]
    ids: np.ndarray  # int64 [T, k]
    logprobs: np.ndarray  # float32 [T, k], log-softmax over the full vocabulary
    ce: float  # mean over t < T-1 of -log p(input_ids[t+1] | input_ids[:t+1])
    token_ce: np.ndarray | None = None  # float32 [T], NaN at the last position

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """Log-probabilities -> uint8 codes (cube-root companding of the probability)."""
    p = np.exp(np.asarray(logprobs, dtype=np.float64))
    return np.rint(_CODE_MAX * np.cbrt(np.clip(p, 0.0, 1.0))).astype(np.uint8)


def decode_logprobs(codes: np.ndarray) -> np.ndarray:
    """uint8 codes -> float32 log-probabilities (-inf for code 0)."""
    with np.errstate(divide="ignore"):
        return (_POWER * np.log(codes.astype(np.float32) / _CODE_MAX)).astype(np.float32)


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _shard_arrays(records: Sequence[TopkRecord], top_k: int, vocab_size: int) -> dict:
    dtype = id_dtype(vocab_size)
    lengths = [len(r) for r in records]
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    for n, r in enumerate(records):
        if r.ids.shape != (len(r), top_k) or r.logprobs.shape != (len(r), top_k):
            raise StoreError(
                f"record {n}: expected ids/logprobs of shape ({len(r)}, {top_k}), "
                f"got {r.ids.shape} / {r.logprobs.shape}"
            )
    input_ids = np.concatenate([r.input_ids for r in records]) if records else np.zeros(0)
    ids = np.concatenate([r.ids for r in records]) if records else np.zeros((0, top_k))
    ids = ids.reshape(-1, top_k)
    for name, arr, low in (("input_ids", input_ids, 0), ("topk_ids", ids, -1)):
        if arr.size and (arr.min() < low or arr.max() >= vocab_size):
            raise StoreError(f"{name} outside [{low}, {vocab_size}): {arr.min()}..{arr.max()}")
    codes = encode_logprobs(
        np.concatenate([r.logprobs for r in records]) if records else np.zeros((0, top_k))
    )
    empty = ids < 0
    codes[empty] = 0  # code 0 marks an empty slot (or a probability too small to matter)
    arrays = {
        "offsets": offsets,
        "input_ids": input_ids.astype(dtype),
        "topk_ids": np.where(empty, 0, ids).astype(dtype),
        "topk_codes": codes,
        "ce": np.array([r.ce for r in records], dtype=np.float32),
    }
    if records and all(r.token_ce is not None for r in records):
        arrays["token_ce"] = np.concatenate([r.token_ce for r in records]).astype(np.float16)
    return arrays


def topk_mass_summary(shards: Sequence[dict]) -> dict | None:
    """The store's ``topk_mass`` from its shards' counts (None if a shard has none).

    ``{"positions": n, "mean": mean top-k mass, "ge_50": share of positions whose top-k holds
    at least 50 % of the probability, "ge_90": ..., "ge_99": ...}``. Integer counts add up
    exactly, so a store joined from shards reports what a single extraction would.
    """
    parts = [s.get("stats", {}).get("topk_mass") for s in shards]
    if not parts or any(p is None for p in parts):
        return None
    positions = sum(p["positions"] for p in parts)
    if positions == 0:
        return {"positions": 0, "mean": None, **dict.fromkeys(MASS_LEVELS)}
    shares = {name: sum(p[name] for p in parts) / positions for name in MASS_LEVELS}
    return {"positions": positions, "mean": sum(p["mass_sum"] for p in parts) / positions, **shares}


class TopkWriter:
    """Writes a store shard by shard; resumes a store left by an interrupted writer.

    `meta` (model and tokenizer fingerprints, parameters) must equal the existing store's for a
    resume: a store made by another model or tokenizer is never silently extended.
    """

    def __init__(self, out_dir, *, top_k: int, vocab_size: int, meta: dict, shard_size: int = 1024):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest = {
            "format": FORMAT,
            "version": VERSION,
            "top_k": top_k,
            "vocab_size": vocab_size,
            "id_dtype": id_dtype(vocab_size).name,
            "value_encoding": "cbrt-u8",
            "shard_size": shard_size,
            "meta": meta,
            "complete": False,
            "count": 0,
            "tokens": 0,
            "bytes": 0,
            "shards": [],
        }
        self._adopt_existing()

    def _adopt_existing(self) -> None:
        path = self.dir / MANIFEST
        if not path.exists():
            return
        old = json.loads(path.read_text())
        for key in ("format", "version", "top_k", "vocab_size", "shard_size", "meta"):
            if old.get(key) != self.manifest[key]:
                raise StoreError(
                    f"{path}: existing store has {key}={old.get(key)!r}, this run has "
                    f"{self.manifest[key]!r}; use another output folder or delete it"
                )
        kept = []
        for index, shard in enumerate(old["shards"]):  # keep the valid prefix
            file = self.dir / shard["file"]
            if (
                shard["index"] != index
                or not file.exists()
                or file.stat().st_size != shard["bytes"]
            ):
                break
            kept.append(shard)
        self.manifest["shards"] = kept
        self._update_totals()

    def _update_totals(self) -> None:
        shards = self.manifest["shards"]
        self.manifest["count"] = sum(s["count"] for s in shards)
        self.manifest["tokens"] = sum(s["tokens"] for s in shards)
        self.manifest["bytes"] = sum(s["bytes"] for s in shards)

    @property
    def done_shards(self) -> int:
        """Number of leading shards already on disk (an interrupted run resumes after them)."""
        return len(self.manifest["shards"])

    def write_shard(
        self,
        records: Sequence[TopkRecord],
        *,
        source_sha256: str | None = None,
        stats: dict | None = None,
    ) -> dict:
        """Write the next shard; `source_sha256` identifies its inputs, `stats` is kept with it."""
        index = self.done_shards
        name = f"shard-{index:05d}.safetensors"
        arrays = _shard_arrays(records, self.manifest["top_k"], self.manifest["vocab_size"])
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        save_file(arrays, str(tmp))
        entry = {
            "index": index,
            "file": name,
            "first": self.manifest["count"],
            "count": len(records),
            "tokens": int(arrays["offsets"][-1]),
            "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp),
            "source_sha256": source_sha256,
            "stats": stats or {},
        }
        os.replace(tmp, self.dir / name)
        self.manifest["shards"].append(entry)
        self._update_totals()
        write_json_atomic(self.dir / MANIFEST, self.manifest)
        return entry

    def finish(self, **extra) -> dict:
        """Mark the store complete; `extra` fields (e.g. timings) go into the manifest."""
        self.manifest.update(extra)
        self.manifest["complete"] = True
        tokens = max(self.manifest["tokens"], 1)
        self.manifest["bytes_per_token"] = self.manifest["bytes"] / tokens
        write_json_atomic(self.dir / MANIFEST, self.manifest)
        return self.manifest


def write_topk(
    out_dir,
    records: Iterable[TopkRecord],
    *,
    top_k: int,
    vocab_size: int,
    meta: dict,
    shard_size: int = 1024,
) -> dict:
    """Write a whole store from records; returns the manifest."""
    writer = TopkWriter(
        out_dir, top_k=top_k, vocab_size=vocab_size, meta=meta, shard_size=shard_size
    )
    if writer.done_shards:
        raise StoreError(f"{writer.dir} already holds a store; write_topk needs an empty folder")
    batch: list[TopkRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) == shard_size:
            writer.write_shard(batch)
            batch = []
    if batch or not writer.done_shards:
        writer.write_shard(batch)
    return writer.finish()


class TopkStore:
    """Random access to a complete store: `len(store)`, `store[i] -> TopkRecord`, iteration."""

    def __init__(self, path, *, verify: bool = True):
        self.dir = Path(path)
        manifest_path = self.dir / MANIFEST
        if not manifest_path.exists():
            raise CorruptStoreError(
                manifest_path, f"{manifest_path}: no top-k store here (manifest.json is missing)"
            )
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise CorruptStoreError(
                manifest_path, f"{manifest_path}: not valid JSON ({err})"
            ) from err
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise StoreError(f"{manifest_path}: not a {FORMAT} v{VERSION} store")
        if not self.manifest.get("complete"):
            raise StoreError(
                f"{manifest_path}: the store is incomplete (its writer was interrupted)"
            )
        self.verify = verify
        self._starts = np.array([s["first"] for s in self.manifest["shards"]], dtype=np.int64)
        self._open: dict[int, dict] = {}

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def meta(self) -> dict:
        return self.manifest["meta"]

    def __len__(self) -> int:
        return self.manifest["count"]

    def __iter__(self) -> Iterator[TopkRecord]:
        for i in range(len(self)):
            yield self[i]

    def _shard(self, index: int) -> dict:
        if index not in self._open:
            entry = self.manifest["shards"][index]
            path = self.dir / entry["file"]
            if not path.exists():
                raise CorruptStoreError(path, f"{path}: shard file is missing")
            if path.stat().st_size != entry["bytes"]:
                raise CorruptStoreError(
                    path,
                    f"{path}: size {path.stat().st_size} != {entry['bytes']} in the manifest "
                    "(truncated or overwritten)",
                )
            if self.verify and sha256_file(path) != entry["sha256"]:
                raise CorruptStoreError(
                    path, f"{path}: sha256 does not match the manifest (corrupted shard)"
                )
            try:
                with safe_open(str(path), framework="numpy") as f:
                    arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
            except Exception as err:  # safetensors raises several types on damaged headers
                raise CorruptStoreError(path, f"{path}: unreadable shard ({err})") from err
            if len(self._open) >= 4:  # keep memory bounded when streaming a large store
                self._open.pop(next(iter(self._open)))
            self._open[index] = arrays
        return self._open[index]

    def __getitem__(self, i: int) -> TopkRecord:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for a store of {len(self)}")
        i %= len(self)
        shard_index = int(np.searchsorted(self._starts, i, side="right") - 1)
        arrays = self._shard(shard_index)
        local = i - int(self._starts[shard_index])
        a, b = int(arrays["offsets"][local]), int(arrays["offsets"][local + 1])
        token_ce = arrays.get("token_ce")
        codes = arrays["topk_codes"][a:b]
        return TopkRecord(
            input_ids=arrays["input_ids"][a:b].astype(np.int64),
            ids=np.where(codes == 0, -1, arrays["topk_ids"][a:b].astype(np.int64)),
            logprobs=decode_logprobs(codes),
            ce=float(arrays["ce"][local]),
            token_ce=None if token_ce is None else token_ce[a:b].astype(np.float32),
        )


def concat_stores(parts: Sequence, out_dir, *, meta: dict | None = None) -> dict:
    """Join complete stores (e.g. one per shard of the pieces, made in parallel) into one.

    Shard files are hard-linked where the filesystem allows, else copied. The parts must come from
    the same model and tokenizer with the same top-k; `meta` entries (e.g. the hash of all the
    pieces) override the first part's. Returns the manifest, written last (atomically).
    """
    stores = [TopkStore(p, verify=False) for p in parts]
    if not stores:
        raise StoreError("no stores to join")
    first = stores[0].manifest
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = {k: v for k, v in first.items() if k not in ("shards", "meta")}
    merged.update(meta={**first["meta"], **(meta or {})}, shards=[], complete=True)
    for store in stores:
        m = store.manifest
        for key in ("format", "version", "top_k", "vocab_size"):
            if m[key] != first[key]:
                raise StoreError(f"{store.dir}: {key}={m[key]!r} differs from {first[key]!r}")
        for key in ("model_fingerprint", "tokenizer_fingerprint"):
            if m["meta"].get(key) != first["meta"].get(key):
                raise StoreError(f"{store.dir}: made by another model or tokenizer ({key} differs)")
        for entry in m["shards"]:
            index = len(merged["shards"])
            name = f"shard-{index:05d}.safetensors"
            target = out / name
            target.unlink(missing_ok=True)
            try:
                os.link(store.dir / entry["file"], target)
            except OSError:
                shutil.copy2(store.dir / entry["file"], target)
            first_record = sum(s["count"] for s in merged["shards"])
            merged["shards"].append({**entry, "index": index, "file": name, "first": first_record})
    for key in ("count", "tokens", "bytes"):
        merged[key] = sum(s[key] for s in merged["shards"])
    merged["bytes_per_token"] = merged["bytes"] / max(merged["tokens"], 1)
    merged.pop("topk_mass", None)  # the first part's: recount over every shard
    mass = topk_mass_summary(merged["shards"])
    if mass is not None:
        merged["topk_mass"] = mass
    write_json_atomic(out / MANIFEST, merged)
    return merged


def open_topk(path, *, verify: bool = True) -> TopkStore:
    """Open a complete store written by `extract_topk`, `write_topk` or the fusion step."""
    return TopkStore(path, verify=verify)
