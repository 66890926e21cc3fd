"""Map a source vocabulary onto a target vocabulary (DESIGN.md §2.3).

Every source id gets the target id with the same canonical string (see `fusellm.method.tokens`) or,
failing that, the target token at the *minimum* Levenshtein distance ("MinED"). Special and
control tokens are not mapped by string: they map by role (the source's EOS to the target's EOS,
and so on) or not at all.

Tie-break, deterministic: ordinary target tokens before byte-fallback `<0xNN>` tokens (the model
emits "A", not `<0x41>`, for the letter A), then the lower id.

Speed: the published code loops in Python over ~28k unmatched MPT tokens (~26 CPU-minutes). We
run rapidfuzz's `cdist` (C++, all cores) in two passes: first against the target tokens whose
length is within ±2 of the query's (a distance of at most 2 found there is provably minimal,
since a length difference of d forces a distance >= d), then against every target token for the
few queries left.
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
from fusellm.method.tokens import canonical_vocabulary

ALGORITHM = "exact+mined-v1"
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
    def load(cls, path) -> "VocabMap":
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


def vocab_map_key(source_tokenizer, target_tokenizer) -> str:
    """Cache key from both tokenizers' content and the algorithm version."""
    return sha256_json(
        {
            "algorithm": ALGORITHM,
            "source": tokenizer_fingerprint(source_tokenizer),
            "target": tokenizer_fingerprint(target_tokenizer),
        }
    )[:32]


def _candidates(target) -> tuple[np.ndarray, list[str]]:
    """Target ids eligible as map targets, in tie-break order: ordinary first, then by id."""
    ids = [i for i, c in enumerate(target.canonical) if c]
    ids.sort(key=lambda i: (bool(target.byte_fallback[i]), i))
    return np.array(ids, dtype=np.int64), [target.canonical[i] for i in ids]


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
    cache_dir=None,
    workers: int = -1,
    progress: bool = True,
) -> VocabMap:
    """Build (or load from `cache_dir`) the source -> target vocabulary map."""
    key = vocab_map_key(source_tokenizer, target_tokenizer)
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
        best, dist = _min_edit_distance(
            [source.canonical[i] for i in pending], cand_strings, workers, progress
        )
        mapping[pending] = cand_ids[best]
        distance[pending] = dist

    vmap = VocabMap(
        mapping,
        exact,
        distance,
        key,
        info={"source_size": size, "target_size": len(target), "algorithm": ALGORITHM},
    )
    if cache_path is not None:
        vmap.save(cache_path)
    return vmap
