"""Map a source vocabulary onto a target vocabulary (docs/design.md §2.3).

A source's top-k is moved into the target's vocabulary one id at a time, so the map decides
which target token receives the mass the source put on each of its tokens. Two methods:

- "prefix" (default): the target token whose text is the longest prefix of the source token's
  text (the whole text when an identical target token exists). Whatever the source's next token
  says, its image then starts the same text, so at an aligned position the mass lands on a
  valid continuation: MPT's " 2019" goes to Llama's "▁" (a space; Llama spells digits one by
  one), not to "▁▁" (two spaces). Prefixes are compared as bytes, so a byte-fallback `<0xE4>`
  is a valid prefix of "你好". Every prefix of a given length is the same string, so the edit
  distance (length difference) cannot split ties: ordinary tokens before byte-fallback ones,
  then the lower id. A source token with no target prefix (an empty string, or a target
  without byte fallback) maps nowhere.
- "mined" (the published MinED, for comparison): identical canonical string, else the target
  token at the minimum Levenshtein distance, same tie-break. The published rule is blind to
  direction: " 2019" is at distance 4 of both "▁▁" and "▁", and the lower id, "▁▁", wins.

Both compare canonical strings (`fusellm.method.tokens`). Special and control tokens are not
mapped by string: they map by role (the source's EOS to the target's EOS, and so on) or not at
all; padding rows map nowhere.

Speed: "prefix" is one dictionary lookup per prefix length of each source token (~0.3 s for 50k
x 32k). For "mined" the published code loops in Python over ~28k unmatched MPT tokens (~26
CPU-minutes); we run rapidfuzz's `cdist` (C++, all cores) in two passes: first against the
target tokens whose length is within ±2 of the query's (a distance of at most 2 found there is
provably minimal, since a length difference of d forces a distance >= d), then against every
target token for the few queries left.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist
from tqdm.auto import tqdm

from fusellm.io.fingerprint import sha256_json, tokenizer_fingerprint
from fusellm.method.tokens import Vocabulary, canonical_vocabulary

METHODS = ("prefix", "mined")
ALGORITHMS = {"prefix": "prefix-v1", "mined": "exact+mined-v2"}
UNMAPPED = -1
_WINDOW = 2
_CHUNK = 2048


@dataclass
class VocabMap:
    """source id -> target id (-1 = unmapped), and whether each mapping is an exact match."""

    source_to_target: np.ndarray  # int64 [source vocab]
    exact: np.ndarray  # bool [source vocab]
    distance: np.ndarray  # int32 [source vocab]; 0 for exact, -1 for unmapped
    key: str
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source_to_target)

    @property
    def method(self) -> str:
        return self.info.get("method", "mined")

    def stats(self) -> dict:
        mapped = self.source_to_target >= 0
        return {
            "source_vocab": len(self),
            "mapped": int(mapped.sum()),
            "exact": int(self.exact.sum()),
            "exact_rate": float(self.exact.sum() / max(len(self), 1)),
            "mean_distance_inexact": float(self.distance[mapped & ~self.exact].mean())
            if (mapped & ~self.exact).any()
            else 0.0,
            **self.info,
        }

    def save(self, path) -> Path:
        """Write to `path` (.npz) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(
            tmp,
            source_to_target=self.source_to_target,
            exact=self.exact,
            distance=self.distance,
            meta=np.array(json.dumps({"key": self.key, "info": self.info})),
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> VocabMap:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                return cls(
                    source_to_target=data["source_to_target"].astype(np.int64),
                    exact=data["exact"].astype(bool),
                    distance=data["distance"].astype(np.int32),
                    key=meta["key"],
                    info=meta.get("info", {}),
                )
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: not a readable vocabulary map ({err})") from err


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown vocabulary map method {method!r}; expected one of {', '.join(METHODS)}")


def vocab_map_key(source_tokenizer, target_tokenizer, method: str = "prefix") -> str:
    """Cache key from both tokenizers' content, the method and its algorithm version."""
    _check_method(method)
    return sha256_json(
        {
            "method": method,
            "algorithm": ALGORITHMS[method],
            "source": tokenizer_fingerprint(source_tokenizer),
            "target": tokenizer_fingerprint(target_tokenizer),
        }
    )[:32]


def _candidates(target: Vocabulary) -> tuple[np.ndarray, list[str]]:
    """Target ids eligible as map targets, in tie-break order: ordinary first, then by id."""
    ids = [i for i, c in enumerate(target.canonical) if c]
    ids.sort(key=lambda i: (bool(target.byte_fallback[i]), i))
    return np.array(ids, dtype=np.int64), [target.canonical[i] for i in ids]


def as_bytes(text: str) -> bytes:
    """A canonical string back to the bytes it stands for (lone bytes were surrogate-escaped)."""
    return text.encode("utf-8", "surrogateescape")


def _longest_prefix(
    queries: list[str], cand_ids: np.ndarray, cand_strings: list[str]
) -> np.ndarray:
    """Per query, the first candidate (in tie-break order) that is its longest byte prefix."""
    table: dict[bytes, int] = {}
    for tid, text in zip(cand_ids, cand_strings):
        table.setdefault(as_bytes(text), int(tid))
    longest = max((len(b) for b in table), default=0)
    out = np.full(len(queries), UNMAPPED, dtype=np.int64)
    for row, query in enumerate(queries):
        data = as_bytes(query)
        for length in range(min(len(data), longest), 0, -1):
            tid = table.get(data[:length])
            if tid is not None:
                out[row] = tid
                break
    return out


def _nearest(queries: list[str], choices: list[str], workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the first closest choice and its distance, for each query (exact MinED)."""
    best = np.empty(len(queries), dtype=np.int64)
    dist = np.empty(len(queries), dtype=np.int32)
    for start in range(0, len(queries), _CHUNK):
        block = cdist(
            queries[start : start + _CHUNK],
            choices,
            scorer=Levenshtein.distance,
            dtype=np.int32,
            workers=workers,
        )
        arg = block.argmin(axis=1)
        best[start : start + _CHUNK] = arg
        dist[start : start + _CHUNK] = block[np.arange(len(arg)), arg]
    return best, dist


def _min_edit_distance(
    queries: list[str], choices: list[str], workers: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Exact minimum-distance choice per query, pruned by length (see module docstring)."""
    q_len = np.array([len(q) for q in queries])
    c_len = np.array([len(c) for c in choices])
    best = np.full(len(queries), -1, dtype=np.int64)
    dist = np.full(len(queries), np.iinfo(np.int32).max, dtype=np.int32)
    lengths = np.unique(q_len)
    bar = tqdm(total=len(queries), desc="vocab map (MinED)", disable=not progress, unit="tok")
    for length in lengths:
        rows = np.flatnonzero(q_len == length)
        window = np.flatnonzero(np.abs(c_len - length) <= _WINDOW)
        if window.size:
            arg, d = _nearest([queries[i] for i in rows], [choices[j] for j in window], workers)
            best[rows], dist[rows] = window[arg], d
        bar.update(len(rows))
    unsettled = np.flatnonzero(dist > _WINDOW)
    if unsettled.size:
        arg, d = _nearest([queries[i] for i in unsettled], choices, workers)
        best[unsettled], dist[unsettled] = arg, d
    bar.close()
    return best, dist


def build_vocab_map(
    source_tokenizer,
    target_tokenizer,
    *,
    method: str = "prefix",
    cache_dir=None,
    workers: int = -1,
    progress: bool = True,
) -> VocabMap:
    """Build (or load from `cache_dir`) the source -> target vocabulary map (see module docstring)."""
    key = vocab_map_key(source_tokenizer, target_tokenizer, method)
    cache_path = Path(cache_dir) / f"vocabmap-{key}.npz" if cache_dir else None
    if cache_path is not None and cache_path.exists():
        return VocabMap.load(cache_path)

    source = canonical_vocabulary(source_tokenizer)
    target = canonical_vocabulary(target_tokenizer)
    cand_ids, cand_strings = _candidates(target)
    first_exact: dict[str, int] = {}
    for tid, text in zip(cand_ids, cand_strings):
        first_exact.setdefault(text, int(tid))

    size = len(source)
    mapping = np.full(size, UNMAPPED, dtype=np.int64)
    exact = np.zeros(size, dtype=bool)
    distance = np.full(size, -1, dtype=np.int32)
    pending: list[int] = []
    for sid, text in enumerate(source.canonical):
        if text is None:
            continue
        tid = first_exact.get(text)
        if tid is None:
            pending.append(sid)
        else:
            mapping[sid], exact[sid], distance[sid] = tid, True, 0
    for role in ("eos", "bos", "pad", "unk"):  # special tokens map by role only, EOS first
        sid = source.roles.get(role)
        if sid is None or mapping[sid] != UNMAPPED:
            continue
        if source.canonical[sid] is None and role in target.roles:
            mapping[sid], exact[sid], distance[sid] = target.roles[role], True, 0

    if pending and cand_strings:
        queries = [source.canonical[i] for i in pending]
        if method == "prefix":
            found = _longest_prefix(queries, cand_ids, cand_strings)
            for sid, query, tid in zip(pending, queries, found):
                if tid != UNMAPPED:
                    mapping[sid] = tid
                    distance[sid] = Levenshtein.distance(query, target.canonical[tid])
        else:
            best, dist = _min_edit_distance(queries, cand_strings, workers, progress)
            mapping[pending] = cand_ids[best]
            distance[pending] = dist

    vmap = VocabMap(
        mapping,
        exact,
        distance,
        key,
        info={
            "source_size": size,
            "target_size": len(target),
            "method": method,
            "algorithm": ALGORITHMS[method],
        },
    )
    if cache_path is not None:
        vmap.save(cache_path)
    return vmap


def _byte_offsets(text: str) -> np.ndarray:
    """Byte offset of every character boundary of `text` (length len(text) + 1)."""
    sizes = [len(ch.encode("utf-8", "surrogatepass")) for ch in text]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


def teacher_signal_counts(
    text: str,
    source_tokenizer,
    target_tokenizer,
    source_to_target: np.ndarray,
    *,
    source_vocab: Vocabulary | None = None,
    target_vocab: Vocabulary | None = None,
) -> dict[str, int]:
    """Where a map sends the source's true next token, at every aligned position of `text`.

    At each target position paired with a source position (same context end, offset alignment)
    where both have a next token: `exact_next` counts mapped tokens equal to the target's own
    next token, `valid` those whose text is a prefix of the text that follows (a continuation
    the target could emit), `source_valid` the source tokens that are themselves such a prefix
    (the ceiling: tokenizers that normalise text can say something slightly different).
    """
    from fusellm.method.align import pair_ends, token_end_chars  # align_positions, by parts

    source_vocab = source_vocab or canonical_vocabulary(source_tokenizer)
    target_vocab = target_vocab or canonical_vocabulary(target_tokenizer)
    t_ids, t_ends = token_end_chars(text, target_tokenizer, role="target")
    s_ids, s_ends = token_end_chars(text, source_tokenizer, role="source")
    pairs = pair_ends(t_ends, s_ends)
    rows = np.flatnonzero((pairs >= 0) & (np.arange(len(pairs)) + 1 < len(t_ids)))
    rows = rows[pairs[rows] + 1 < len(s_ids)]
    data, offsets = text.encode("utf-8", "surrogatepass"), _byte_offsets(text)
    counts = {"positions": len(rows), "exact_next": 0, "valid": 0, "source_valid": 0}
    for i in rows:
        start = int(offsets[t_ends[i]])
        source_next = int(s_ids[pairs[i] + 1])
        if source_vocab.canonical[source_next] is not None:
            counts["source_valid"] += data.startswith(as_bytes(source_vocab.canonical[source_next]), start)
        mapped = int(source_to_target[source_next]) if source_next < len(source_to_target) else -1
        if mapped < 0:
            continue
        counts["exact_next"] += mapped == t_ids[i + 1]
        piece = target_vocab.canonical[mapped]
        counts["valid"] += piece is not None and data.startswith(as_bytes(piece), start)
    return {key: int(value) for key, value in counts.items()}

