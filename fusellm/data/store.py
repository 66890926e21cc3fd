"""Compact, checksummed storage of per-position top-k next-token distributions.

Layout of a store folder:

    manifest.json              format, top-k, vocab size, fingerprints, one entry per shard
    shard-00000.safetensors    records [0, shard_size)
    shard-00001.safetensors    ...

What a shard holds, for its records concatenated along the token axis (T tokens, n records):
    input_ids  [T]      the records' token ids
    topk_ids   [T, k]   top-k next-token ids at each position
    topk_codes [T, k]   probabilities as 8-bit codes, code = round(255 * p ** (1/3));
                        code 0 = empty slot (read back as id -1, log-prob -inf)
    ce         [n]      mean next-token cross-entropy of each record (float32)
    token_ce   [T]      optional: -log p(token t+1) at position t, float16 (NaN at the last one)
    trained    [T]      optional: position t is in the loss (chat pieces: it predicts assistant
                        text or its turn's end; `fusellm.data.chat`), one bit each

On disk (format version 2) the shard is a safetensors file with `offsets` (int64 [n + 1]: record
i spans tokens offsets[i]:offsets[i+1]), `ce`, and `streams`: byte streams, each compressed with
zstd on its own, named with their compressed lengths in the header's metadata. Everything is
lossless (ids, codes and the float16 bits of `token_ce` read back exactly); the streams only
arrange the numbers so that zstd's entropy coder sees simple distributions:

- ids: a top-k id equal to the next input token (top-1 is the model's guess, and often right)
  becomes 0 (so does an empty slot), any other id v becomes v + 1. Each id is then split into a symbol (its bit length
  and 3 leading bits, one byte) and its remaining low bits; one symbol stream per column
  (input ids, rank 0, ..., rank k-1), the low bits pooled over the columns by their number (an
  incomplete byte in a stream of its own per width, whole bytes together). Top-k ids of real
  models crowd on frequent, low ids, so the symbols carry most of the information.
- codes: rank 0 as is, rank j > 0 as the drop from rank j - 1 (mod 256), one stream per rank
  and per quarter of the previous code's range.
- token_ce: the float16 bits minus the bits of -3 ln(code / 255) for the slot that holds the
  next token (or for the last slot when none does), zigzag-coded and split as the ids are. The
  prediction table is stored in the shard (`token_ce_table`), so decoding needs no float maths.

At k = 10 with per-token CE that is 22-24 bytes per token on data shaped like a real model's,
for 49,152 to 262,144 entries (format 1 took 34 with 16-bit ids, 56 with 32-bit ids), against
~100 in the published Arrow lists (fp16 values + int64 ids); `benchmarks/bench_store.py`
measures it. The cube-root code keeps the absolute error on any probability below 0.006 (at p
near 1) while small probabilities keep a relative precision of a few percent; probabilities
under 7.5e-9 read back as empty slots (id -1, log-prob -inf: weight zero in the loss). Stores of
format version 1 (the same numbers as plain arrays, uint16 or uint32 ids) are still read.

Shards are written to a temporary name and renamed; the manifest is rewritten (atomically) after
each shard, so an interrupted writer leaves a valid prefix that a new writer resumes from.
Every shard's sha256 is checked when the shard is first read.

The stored values are the model's real probabilities (log-softmax over its whole output), not
renormalised over the k kept: 1 - sum of a row is the mass the top-k dropped, which the fusion
loss's rest bucket uses (`fusellm.method.loss`). An extraction store's manifest also says how
much of that mass its top-k holds (`topk_mass`, see `topk_mass_summary`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fusellm.io.files import CorruptFileError, write_json_atomic

FORMAT = "fusellm-topk"
VERSION = 2  # 2: zstd-compressed streams; 1: plain arrays (still read)
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
_CODE_MAX = 255
_POWER = 3.0
MASS_LEVELS = {"ge_50": 0.5, "ge_90": 0.9, "ge_99": 0.99}  # top-k mass shares in the manifest
# zstd's fastest positive level, matching runs of 7 bytes or more only: what these streams hold
# is skewed symbol frequencies (zstd's Huffman coding), not repeats, and short matches cost
# more than they save (higher levels make the streams larger, except 19, 1.5 % smaller at 100x
# the time)
_ZSTD_LEVEL, _ZSTD_MIN_MATCH = 1, 7
# Part of format version 2 (a reader must use the writer's values):
_LEAD_BITS = 3  # leading bits of an integer kept in its symbol
_CONTEXT_SHIFT = 6  # a code's drop is coded per rank and per quarter of the previous code


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
    trained: np.ndarray | None = None  # bool [T]: positions in the loss (None: all of them)

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
    """Smallest unsigned dtype that holds every id of the vocabulary (in memory, and on disk in
    format version 1)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _shard_arrays(records: Sequence[TopkRecord], top_k: int, vocab_size: int) -> dict:
    """The shard's numbers as plain arrays (what format version 1 stored, and what a read gives)."""
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
        "topk_ids": np.where(codes == 0, 0, ids).astype(dtype),
        "topk_codes": codes,
        "ce": np.array([r.ce for r in records], dtype=np.float32),
    }
    if records and all(r.token_ce is not None for r in records):
        arrays["token_ce"] = np.concatenate([r.token_ce for r in records]).astype(np.float16)
    if records and any(r.trained is not None for r in records):
        arrays["trained"] = np.concatenate(
            [np.ones(len(r), bool) if r.trained is None else r.trained for r in records]
        ).astype(bool)
    return arrays


# ---------------------------------------------------------------------------------------------
# Format version 2: the arrays as zstd-compressed byte streams (lossless)


def _symbol_tables() -> tuple[np.ndarray, np.ndarray]:
    """Symbol -> (leading bits, width of the remaining low bits); symbols < 2**_LEAD_BITS are
    the small integers themselves."""
    half = 1 << (_LEAD_BITS - 1)
    symbols = np.arange(256)
    width = np.where(symbols < 2 * half, 0, symbols // half - 1)
    lead = np.where(symbols < 2 * half, symbols, symbols % half + half)
    return lead.astype(np.uint32), width.astype(np.uint8)


_SYMBOL_LEAD, _SYMBOL_WIDTH = _symbol_tables()


def _split_ints(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integers in [0, 2**32) -> (symbol uint8, width of the low bits, the low bits)."""
    x = x.astype(np.uint32)
    width = np.maximum(np.frexp(x.astype(np.float64))[1] - _LEAD_BITS, 0).astype(np.uint8)
    lead = x >> width
    half = 1 << (_LEAD_BITS - 1)
    symbol = np.where(width > 0, half * width.astype(np.uint32) + lead, lead).astype(np.uint8)
    low = x & ((np.uint32(1) << width) - np.uint32(1))
    return symbol, width, low


def _put_ints(streams: dict, group: str, columns: Sequence[np.ndarray]) -> None:
    """Integer columns -> one symbol stream per column, and the low bits pooled by their width.

    The low bits of one width are laid out column after column, in order within a column;
    an incomplete top byte goes to that width's own stream, whole bytes (low byte first, one
    plane after the other) to one stream for all widths.
    """
    parts: dict[int, list[np.ndarray]] = {}
    for i, column in enumerate(columns):
        symbol, width, low = _split_ints(column)
        streams[f"{group}.s{i}"] = symbol
        low = low[np.argsort(width, kind="stable")]
        start = 0
        for w, n in enumerate(np.bincount(width, minlength=33)):
            if n and w:
                parts.setdefault(w, []).append(low[start : start + n])
            start += n
    whole = []
    for w in sorted(parts):
        low = np.concatenate(parts[w]).astype("<u4")
        full, rest = divmod(w, 8)
        if full:
            whole.append(low.view(np.uint8).reshape(-1, 4)[:, :full].T.ravel())
        if rest:
            streams[f"{group}.w{w}"] = (low >> np.uint32(8 * full)).astype(np.uint8)
    if whole:
        streams[f"{group}.bytes"] = np.concatenate(whole)


def _get_ints(streams: _StreamReader, group: str, lengths: Sequence[int]) -> list[np.ndarray]:
    """Inverse of `_put_ints`: the columns (uint32) of the given lengths."""
    symbols = [streams.get(f"{group}.s{i}", n) for i, n in enumerate(lengths)]
    widths = [_SYMBOL_WIDTH[s] for s in symbols]
    counts = [np.bincount(w, minlength=33) for w in widths]
    totals = np.sum(counts, axis=0) if counts else np.zeros(33, dtype=np.int64)
    whole = streams.get(f"{group}.bytes", sum(int(n) * (w // 8) for w, n in enumerate(totals)))
    planes, tops, used = {}, {}, 0
    for w in np.nonzero(totals[1:])[0] + 1:
        n = int(totals[w])
        full, rest = divmod(int(w), 8)
        planes[w] = whole[used : used + n * full].reshape(full, n)
        used += n * full
        if rest:
            tops[w] = streams.get(f"{group}.w{w}", n)
    cursor = dict.fromkeys(planes, 0)
    out = []
    for symbol, width, count in zip(symbols, widths, counts):
        low = np.zeros(len(symbol), dtype=np.uint32)
        start = 0
        for w in np.nonzero(count)[0]:
            n = int(count[w])
            if w:
                a, value = cursor[w], low[start : start + n]
                for byte, plane in enumerate(planes[w]):
                    value |= plane[a : a + n].astype(np.uint32) << np.uint32(8 * byte)
                if w in tops:
                    value |= tops[w][a : a + n].astype(np.uint32) << np.uint32(8 * (w // 8))
                cursor[w] += n
            start += n
        ordered = np.empty_like(low)
        ordered[np.argsort(width, kind="stable")] = low
        out.append((_SYMBOL_LEAD[symbol] << width) | ordered)
    return out


def _put_codes(streams: dict, codes: np.ndarray) -> None:
    """Codes [T, k] -> rank 0, then each rank's drop from the previous, split by context."""
    streams["c0"] = codes[:, 0]
    for j in range(1, codes.shape[1]):
        previous = codes[:, j - 1]
        context = previous >> _CONTEXT_SHIFT
        drop = (previous - codes[:, j])[np.argsort(context, kind="stable")]  # uint8: mod 256
        start = 0
        for u, n in enumerate(np.bincount(context, minlength=256 >> _CONTEXT_SHIFT)):
            streams[f"c{j}.{u}"] = drop[start : start + n]
            start += n


def _get_codes(streams: _StreamReader, length: int, top_k: int) -> np.ndarray:
    codes = np.empty((top_k, length), dtype=np.uint8)
    if top_k:
        codes[0] = streams.get("c0", length)
    for j in range(1, top_k):
        context = codes[j - 1] >> _CONTEXT_SHIFT
        counts = np.bincount(context, minlength=256 >> _CONTEXT_SHIFT)
        drop = np.empty(length, dtype=np.uint8)
        drop[np.argsort(context, kind="stable")] = np.concatenate(
            [streams.get(f"c{j}.{u}", n) for u, n in enumerate(counts)]
        )
        codes[j] = codes[j - 1] - drop
    return codes.T.copy()


def _token_ce_table() -> np.ndarray:
    """float16 bits of -ln p for each code's p (code 0: half the smallest code's p)."""
    codes = np.arange(256, dtype=np.float64)
    codes[0] = 0.5
    return (-_POWER * np.log(codes / _CODE_MAX)).astype(np.float16).view(np.uint16)


def _next_ids(input_ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The token after each position within its record; -1 at each record's last position."""
    nxt = np.full(len(input_ids), -1, dtype=np.int64)
    nxt[:-1] = input_ids[1:]
    ends = offsets[1:][offsets[1:] > offsets[:-1]] - 1
    nxt[ends] = -1
    return nxt


def _token_ce_guess(is_next: np.ndarray, codes: np.ndarray, table: np.ndarray):
    """Whether the next token is among the top-k, and the float16 bits of the guessed CE: the
    table's value for the code of its slot (or of the last slot)."""
    hit = is_next & (codes > 0)
    found = hit.any(axis=1)
    rank = np.where(found, hit.argmax(axis=1), codes.shape[1] - 1)
    return found, table[codes[np.arange(len(codes)), rank]]


def _encode_shard(arrays: dict, top_k: int) -> tuple[dict, dict]:
    """Plain shard arrays -> (tensors, metadata) of a format 2 shard file."""
    offsets, codes = arrays["offsets"], arrays["topk_codes"]
    input_ids = arrays["input_ids"].astype(np.int64)
    nxt = _next_ids(input_ids, offsets)
    is_next = np.empty(codes.shape, dtype=bool)
    columns = [input_ids]
    for j in range(top_k):  # the next token -> 0 (empty slots too), any other id v -> v + 1
        ids = arrays["topk_ids"][:, j].astype(np.int64)
        is_next[:, j] = ids == nxt
        columns.append(np.where(is_next[:, j] | (codes[:, j] == 0), 0, ids + 1))
    streams: dict[str, np.ndarray] = {}
    _put_ints(streams, "id", columns)
    _put_codes(streams, codes)
    tensors = {"offsets": offsets, "ce": arrays["ce"]}
    if "token_ce" in arrays:
        table = _token_ce_table()
        found, guess = _token_ce_guess(is_next, codes, table)
        diff = (arrays["token_ce"].view(np.uint16) - guess).view(np.int16).astype(np.int32)
        zigzag = (diff << 1) ^ (diff >> 15)
        _put_ints(streams, "tce", [zigzag[found], zigzag[~found]])
        tensors["token_ce_table"] = table
    if "trained" in arrays:
        streams["trained"] = np.packbits(arrays["trained"])
        tensors["trained_tokens"] = np.array([len(arrays["trained"])], dtype=np.int64)
    compressor = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            _ZSTD_LEVEL, min_match=_ZSTD_MIN_MATCH, write_checksum=0
        )
    )
    names, frames = [], []
    for name, data in streams.items():
        if len(data):
            frames.append(compressor.compress(np.ascontiguousarray(data).tobytes()))
            names.append(f"{name}:{len(frames[-1])}")
    tensors["streams"] = np.frombuffer(b"".join(frames), dtype=np.uint8)
    return tensors, {"streams": ",".join(names)}


class _StreamReader:
    """The named streams of a format 2 shard, each decompressed when asked for."""

    def __init__(self, path: Path, blob: np.ndarray, index: str):
        self.path, self.blob, self.frames = path, blob.tobytes(), {}
        start = 0
        for item in filter(None, index.split(",")):
            name, size = item.rsplit(":", 1)
            self.frames[name] = (start, start + int(size))
            start += int(size)
        if start != len(self.blob):
            raise CorruptStoreError(path, f"{path}: streams do not add up to the stored bytes")
        self.decompressor = zstandard.ZstdDecompressor()

    def get(self, name: str, length: int) -> np.ndarray:
        if name not in self.frames:
            if length:
                raise CorruptStoreError(self.path, f"{self.path}: stream {name} is missing")
            return np.zeros(0, dtype=np.uint8)
        a, b = self.frames[name]
        try:
            data = self.decompressor.decompress(self.blob[a:b], max_output_size=length)
        except zstandard.ZstdError as err:
            raise CorruptStoreError(self.path, f"{self.path}: stream {name}: {err}") from err
        if len(data) != length:
            raise CorruptStoreError(
                self.path, f"{self.path}: stream {name} holds {len(data)} bytes, not {length}"
            )
        return np.frombuffer(data, dtype=np.uint8)


def _decode_shard(path: Path, tensors: dict, metadata: dict, top_k: int, vocab_size: int) -> dict:
    """A format 2 shard file's tensors -> the plain shard arrays."""
    offsets = tensors["offsets"]
    tokens = int(offsets[-1])
    streams = _StreamReader(path, tensors["streams"], metadata.get("streams", ""))
    columns = _get_ints(streams, "id", [tokens] * (top_k + 1))
    input_ids = columns[0]
    nxt = _next_ids(input_ids, offsets).astype(np.uint32)  # -1 -> 2**32 - 1: never read
    codes = _get_codes(streams, tokens, top_k)
    dtype = id_dtype(vocab_size)
    ids = np.empty((tokens, top_k), dtype=dtype)
    is_next = np.empty((tokens, top_k), dtype=bool)
    for j, marked in enumerate(columns[1:]):
        is_next[:, j] = marked == 0
        marked -= np.uint32(1)
        np.copyto(marked, nxt, where=is_next[:, j])
        marked[codes[:, j] == 0] = 0
        ids[:, j] = marked
    arrays = {
        "offsets": offsets,
        "input_ids": input_ids.astype(dtype),
        "topk_ids": ids,
        "topk_codes": codes,
        "ce": tensors["ce"],
    }
    if "token_ce_table" in tensors:
        found, guess = _token_ce_guess(is_next, codes, tensors["token_ce_table"])
        hits, misses = _get_ints(streams, "tce", [int(found.sum()), int((~found).sum())])
        zigzag = np.empty(tokens, dtype=np.uint32)
        zigzag[found], zigzag[~found] = hits, misses
        diff = ((zigzag >> np.uint32(1)) ^ -(zigzag & np.uint32(1))).astype(np.uint16)
        arrays["token_ce"] = (diff + guess).view(np.float16)  # mod 2**16
    if "trained_tokens" in tensors:
        bits = streams.get("trained", (tokens + 7) // 8)
        arrays["trained"] = np.unpackbits(bits, count=tokens).astype(bool)
    return arrays


def _header_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file's header."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


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
            "value_encoding": "cbrt-u8",
            "compression": "zstd",
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
        top_k = self.manifest["top_k"]
        arrays = _shard_arrays(records, top_k, self.manifest["vocab_size"])
        tensors, metadata = _encode_shard(arrays, top_k)
        data = save_safetensors(tensors, metadata=metadata)
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        entry = {
            "index": index,
            "file": name,
            "first": self.manifest["count"],
            "count": len(records),
            "tokens": int(arrays["offsets"][-1]),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "source_sha256": source_sha256,
            "stats": stats or {},
        }
        os.replace(tmp, self.dir / name)
        self.manifest["shards"].append(entry)
        self._update_totals()
        write_json_atomic(self.dir / MANIFEST, self.manifest)
        return entry

    def finish(self, **extra) -> dict:
        """Mark the store complete; `extra` fields (e.g. summaries of the shards) go into the
        manifest, which must hold only what follows from the content."""
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
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{manifest_path}: not a {FORMAT} store")
        if self.manifest.get("version") not in READABLE_VERSIONS:
            raise StoreError(
                f"{manifest_path}: {FORMAT} version {self.manifest.get('version')!r}, this code "
                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}; extract it again"
            )
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
            data = path.read_bytes()
            if self.verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CorruptStoreError(
                    path, f"{path}: sha256 does not match the manifest (corrupted shard)"
                )
            try:
                tensors = load_safetensors(data)
                if self.manifest["version"] == 1:
                    arrays = tensors
                else:
                    metadata = _header_metadata(data)
                    vocab = self.manifest["vocab_size"]
                    arrays = _decode_shard(path, tensors, metadata, self.top_k, vocab)
            except CorruptStoreError:
                raise
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
        token_ce, trained = arrays.get("token_ce"), arrays.get("trained")
        codes = arrays["topk_codes"][a:b]
        return TopkRecord(
            input_ids=arrays["input_ids"][a:b].astype(np.int64),
            ids=np.where(codes == 0, -1, arrays["topk_ids"][a:b].astype(np.int64)),
            logprobs=decode_logprobs(codes),
            ce=float(arrays["ce"][local]),
            token_ce=None if token_ce is None else token_ce[a:b].astype(np.float32),
            trained=None if trained is None else trained[a:b].copy(),
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
