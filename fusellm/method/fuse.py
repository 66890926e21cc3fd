"""Sparse distributions in the target vocabulary: transfer from a source, and fusion (docs/design.md §2.4-2.5).

A distribution over a large vocabulary is kept as its top-k: `ids` [T, k] (int64, -1 = empty
slot) and `logprobs` [T, k] (float32, -inf = empty). Row t describes the token after position t.
Everything here is vectorised numpy over whole sequences; nothing is dense over the vocabulary.
"""

from __future__ import annotations

import numpy as np

EMPTY_ID = -1


def empty_topk(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rows, k), EMPTY_ID, dtype=np.int64), np.full((rows, k), -np.inf, dtype=np.float32)


def merge_topk(ids: np.ndarray, logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: add up the probabilities of repeated ids (log-sum-exp), keep the k largest.

    Empty slots (id < 0 or -inf) are dropped; rows with fewer than k ids are padded with empty
    slots. Ties are broken by the lower id, so the result does not depend on input order.
    """
    rows, _ = ids.shape
    valid = (ids >= 0) & np.isfinite(logprobs)
    out_ids, out_lp = empty_topk(rows, k)
    if not valid.any():
        return out_ids, out_lp
    stride = int(ids.max()) + 1
    row_of = np.broadcast_to(np.arange(rows)[:, None], ids.shape)[valid]
    keys = row_of.astype(np.int64) * stride + ids[valid]
    unique, inverse = np.unique(keys, return_inverse=True)
    values = np.full(len(unique), -np.inf)
    np.logaddexp.at(values, inverse, logprobs[valid].astype(np.float64))
    u_row, u_id = unique // stride, unique % stride
    order = np.lexsort((u_id, -values, u_row))  # row, then value descending, then id
    u_row, u_id, values = u_row[order], u_id[order], values[order]
    rank = np.arange(len(u_row)) - np.searchsorted(u_row, u_row)
    keep = rank < k
    out_ids[u_row[keep], rank[keep]] = u_id[keep]
    out_lp[u_row[keep], rank[keep]] = values[keep]
    return out_ids, out_lp


def one_hot_topk(next_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The target's own next token with probability 1 (-1 where there is no next token)."""
    ids, lp = empty_topk(len(next_ids), k)
    has_next = next_ids >= 0
    ids[has_next, 0] = next_ids[has_next]
    lp[has_next, 0] = 0.0
    return ids, lp


def transfer(
    source_ids: np.ndarray,
    source_logprobs: np.ndarray,
    alignment: np.ndarray,
    source_to_target: np.ndarray,
    target_next: np.ndarray,
    k: int,
    source_next: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """A source's top-k moved onto the target's positions and vocabulary.

    Aligned target position i takes the source row `alignment[i]`, each id mapped through the
    vocabulary map; ids that land on the same target id merge by log-sum-exp (the mass the
    source put on that continuation is kept whole). Dropped before any lookup: empty slots
    (id -1 or -inf) and ids past the end of the map, i.e. padding rows of a model whose output
    is larger than its tokenizer (MPT-7B: 50,432 rows for ~50,277 tokens); unmapped ids are
    dropped too. Unaligned positions, and aligned ones left with nothing, get the one-hot of
    the target's next token (as the paper). Returns (ids, logprobs, padded ids dropped).

    `source_next` (the source's own next token at each of its positions, -1 after the last):
    the mass the source puts on the token it really reads next goes to the token the target
    really reads next. Both spell the start of the same text, cut differently (Qwen's
    " interface" + "s" where SmolLM2 reads " interfaces"); the vocabulary map would send it to
    the target token with the source's spelling, a segmentation the target's tokenizer never
    produces there, so the fusion term would pull the student away from its own tokens.
    """
    if len(alignment) != len(target_next):
        raise ValueError(
            f"alignment has {len(alignment)} positions, target has {len(target_next)}"
        )
    ids, lp = one_hot_topk(target_next, k)
    aligned = np.flatnonzero(alignment >= 0)
    if not aligned.size:
        return ids, lp, 0
    rows = alignment[aligned]
    if rows.max() >= len(source_ids):
        raise ValueError(
            f"alignment points at source position {rows.max()}, source has {len(source_ids)}"
        )
    src, vals = source_ids[rows], source_logprobs[rows]
    filled = (src >= 0) & np.isfinite(vals)
    padded = filled & (src >= len(source_to_target))
    usable = filled & ~padded
    mapped = np.full(src.shape, EMPTY_ID, dtype=np.int64)
    mapped[usable] = source_to_target[src[usable]]
    if source_next is not None:
        truth = usable & (src == source_next[rows][:, None]) & (target_next[aligned][:, None] >= 0)
        mapped[truth] = np.broadcast_to(target_next[aligned][:, None], mapped.shape)[truth]
    moved_ids, moved_lp = merge_topk(mapped, np.where(mapped >= 0, vals, -np.inf), k)
    keep = moved_ids[:, 0] >= 0  # rows where nothing survived keep the one-hot
    ids[aligned[keep]], lp[aligned[keep]] = moved_ids[keep], moved_lp[keep]
    return ids, lp.astype(np.float32), int(padded.sum())


def _candidate_stack(candidates) -> tuple[np.ndarray, np.ndarray]:
    ids = np.stack([c[0] for c in candidates])  # [C, T, k]
    lps = np.stack([c[1] for c in candidates])
    return ids, lps


def _ce_matrix(ce, n_candidates: int, rows: int) -> np.ndarray:
    """CE as [C, T]: a per-sequence CE [C] is broadcast over positions. NaN means 'absent'."""
    ce = np.asarray(ce, dtype=np.float64)
    if ce.shape[0] != n_candidates:
        raise ValueError(f"got {ce.shape[0]} CE values for {n_candidates} candidates")
    if ce.ndim == 1:
        ce = np.repeat(ce[:, None], rows, axis=1)
    return np.where(np.isnan(ce), np.inf, ce)


def min_ce(candidates, ce) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MinCE: at each position take the candidate with the lowest CE (the first one on ties).

    `candidates` is a list of (ids, logprobs) [T, k]; put the target's own distribution first.
    `ce` is [C] (per sequence, the paper) or [C, T] (per token; NaN/inf = not a candidate there).
    Returns (ids, logprobs, winner [T]).
    """
    ids, lps = _candidate_stack(candidates)
    costs = _ce_matrix(ce, len(candidates), ids.shape[1])
    winner = np.argmin(costs, axis=0)
    rows = np.arange(ids.shape[1])
    return ids[winner, rows], lps[winner, rows], winner


def renormalise(ids: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """Log-probabilities of the kept top-k, renormalised to sum to 1 per row (empty rows stay empty).

    This is what the published collator does to every candidate (a softmax over its k values)
    before mixing: each candidate then brings exactly its weight, whatever mass its top-k held.
    """
    valid = (ids >= 0) & np.isfinite(logprobs)
    lp = np.where(valid, logprobs.astype(np.float64), -np.inf)
    peak = lp.max(axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_z = np.log(np.exp(lp - peak).sum(axis=-1, keepdims=True)) + peak
        return np.where(valid, lp - log_z, -np.inf)


def published_weights(costs: np.ndarray) -> np.ndarray:
    """softmax over candidates of exp(-CE): the published code calls 1/exp(CE) the reward and
    softmaxes the rewards. Rewards live in (0, 1], so the weights are flat: CEs of 1 and 3 nats
    weigh 0.58 / 0.42 (softmax(-CE) would say 0.88 / 0.12). Absent candidates (inf) weigh 0."""
    reward = np.where(np.isfinite(costs), np.exp(-costs), -np.inf)
    weights = np.exp(reward - reward.max(axis=0, keepdims=True))
    return weights / weights.sum(axis=0, keepdims=True)


def boltzmann_weights(costs: np.ndarray) -> np.ndarray:
    """softmax over candidates of -CE, i.e. weights proportional to exp(-CE) (our earlier variant)."""
    weights = np.exp(-(costs - costs.min(axis=0, keepdims=True)))
    return weights / weights.sum(axis=0, keepdims=True)


def _mix(ids, lps, weights, k):
    """sum_c w_c P_c per position, as a top-k (duplicate ids add up)."""
    with np.errstate(divide="ignore"):
        log_w = np.log(weights)[:, :, None]
    mixed_ids = ids.transpose(1, 0, 2).reshape(ids.shape[1], -1)
    mixed_lp = (lps + log_w).transpose(1, 0, 2).reshape(ids.shape[1], -1)
    out_ids, out_lp = merge_topk(mixed_ids, mixed_lp, k)
    return out_ids, out_lp.astype(np.float32)


def _costs(candidates, ce):
    ids, lps = _candidate_stack(candidates)
    costs = _ce_matrix(ce, len(candidates), ids.shape[1])
    if np.isinf(costs.min(axis=0)).any():
        raise ValueError("AvgCE: some position has no candidate with a finite CE")
    return ids, lps, costs


def avg_ce(candidates, ce, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AvgCE as published: each candidate's top-k renormalised, mixed with weights
    softmax(exp(-CE)) over the candidates present, then the k largest kept.

    Returns (ids, logprobs, weights [C, T]).
    """
    ids, lps, costs = _costs(candidates, ce)
    weights = published_weights(costs)
    return (*_mix(ids, renormalise(ids, lps), weights, k), weights)


def avg_ce_unnormalised(candidates, ce, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Our earlier AvgCE, kept for comparison: weights softmax(-CE) (proportional to exp(-CE))
    and each candidate's top-k mixed as stored, not renormalised, so a one-hot row (mass 1)
    outweighs a real top-k (mass < 1) given the same weight.

    Returns (ids, logprobs, weights [C, T]).
    """
    ids, lps, costs = _costs(candidates, ce)
    weights = boltzmann_weights(costs)
    return (*_mix(ids, lps, weights, k), weights)


FUSIONS = ("min_ce", "avg_ce", "avg_ce_unnormalised")


def fuse(candidates, ce, *, method: str = "min_ce", k: int | None = None):
    """Dispatch on `method` (one of FUSIONS); returns (ids, logprobs, winner-or-weights)."""
    if method == "min_ce":
        return min_ce(candidates, ce)
    k = k or candidates[0][0].shape[1]
    if method == "avg_ce":
        return avg_ce(candidates, ce, k)
    if method == "avg_ce_unnormalised":
        return avg_ce_unnormalised(candidates, ce, k)
    raise ValueError(f"unknown fusion method {method!r}; expected one of {', '.join(FUSIONS)}")
