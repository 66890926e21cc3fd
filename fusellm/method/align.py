"""Pair target and source token positions whose contexts end at the same character.

The distribution at target position i predicts what follows the character where token t_i ends;
a source position j can stand in for it only if s_j ends at that same character (docs/design.md §2.4).
With character offsets from fast tokenizers this is a sorted-merge in linear time. The published
method pairs token *strings* with quadratic DTW (`method="dtw"`, for comparison only) and can pair
positions whose contexts end at different characters.

Positions whose context does not end at a character boundary are never paired: a byte-level
token that stops inside a multi-byte character, a byte-fallback piece, or a zero-width token such
as a lone SentencePiece "▁" that stands for no character of the text.
"""

from __future__ import annotations

import numpy as np

UNALIGNED = -1


def _check_fast(tokenizer, role: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{role} tokenizer {type(tokenizer).__name__} is a slow (Python) tokenizer and "
            "cannot report character offsets; load it with use_fast=True "
            "(AutoTokenizer.from_pretrained(..., use_fast=True)) or convert it to a fast one"
        )


def token_end_chars(text: str, tokenizer, *, role: str = "target", ids=None):
    """Token ids of `text` and the character where each token's context ends (-1 if mid-character).

    If `ids` is given (e.g. read back from a store) it must equal the tokenization of `text`.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"cannot align an empty text (got {text!r})")
    _check_fast(tokenizer, role)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    got = np.asarray(enc["input_ids"], dtype=np.int64)
    if ids is not None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape != got.shape or not np.array_equal(ids, got):
            n = min(len(ids), len(got))
            diff = np.flatnonzero(ids[:n] != got[:n])
            where = int(diff[0]) if diff.size else n
            raise ValueError(
                f"{role} ids do not match the text: the {role} tokenizer gives {len(got)} tokens, "
                f"the ids have {len(ids)}; first difference at token {where}"
            )
    spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return got, context_ends(spans, text)


def _close_gaps(spans: np.ndarray, real: np.ndarray, text: str) -> np.ndarray:
    """Extend a token's end over following characters that no token covers, unless blank.

    A normalizer that composes characters (NFC turns "e" + U+0301 into "é") reports the span of
    the composed token as the first original character only; the combining mark is consumed
    all the same, so the context really ends after it. Skipped whitespace (WordPiece drops
    spaces) is left alone: the next token stands for it.
    """
    ends = spans[:, 1].copy()
    nexts = np.append(spans[real[1:], 0], len(text))
    gaps = np.flatnonzero(nexts > ends[real])
    for pos, nxt in zip(real[gaps], nexts[gaps]):
        if text[ends[pos] : nxt].strip():
            ends[pos] = nxt
    return ends


def context_ends(spans: np.ndarray, text: str) -> np.ndarray:
    """Character where each token's context ends, or -1 when it does not end on a character.

    Tokens that end inside a character share their span's end with the token that completes the
    character; only the last of such a run really ends there. Zero-width tokens end nowhere.
    """
    zero_width = spans[:, 1] <= spans[:, 0]
    real = np.flatnonzero(~zero_width)
    ends = _close_gaps(spans, real, text) if real.size else spans[:, 1].copy()
    ends[zero_width] = UNALIGNED
    if real.size > 1:
        same_as_next = ends[real[:-1]] == ends[real[1:]]
        ends[real[:-1][same_as_next]] = UNALIGNED
    return ends


def pair_ends(target_ends: np.ndarray, source_ends: np.ndarray) -> np.ndarray:
    """For each target position, the source position with the same context end, or -1."""
    target_ends = np.asarray(target_ends, dtype=np.int64)
    source_ends = np.asarray(source_ends, dtype=np.int64)
    out = np.full(len(target_ends), UNALIGNED, dtype=np.int64)
    src_pos = np.flatnonzero(source_ends >= 0)
    src_vals = source_ends[src_pos]
    tgt_pos = np.flatnonzero(target_ends >= 0)
    if not src_pos.size or not tgt_pos.size:
        return out
    if np.any(np.diff(src_vals) <= 0):  # offsets out of order: keep the last token per end
        last = {int(v): int(p) for p, v in zip(src_pos, src_vals)}
        src_vals = np.array(sorted(last), dtype=np.int64)
        src_pos = np.array([last[v] for v in src_vals], dtype=np.int64)
    found = np.searchsorted(src_vals, target_ends[tgt_pos])
    found_ok = found < len(src_vals)
    hit = np.zeros(len(tgt_pos), dtype=bool)
    hit[found_ok] = src_vals[found[found_ok]] == target_ends[tgt_pos[found_ok]]
    out[tgt_pos[hit]] = src_pos[found[hit]]
    return out


def align_positions(
    text: str,
    target_tokenizer,
    source_tokenizer,
    method: str = "offsets",
    *,
    target_ids=None,
    source_ids=None,
    **dtw_options,
) -> np.ndarray:
    """Index of the aligned source token for each target token of `text` (-1 where none).

    Both sides are tokenized with `add_special_tokens=False`. `target_ids` / `source_ids`, when
    given, are checked against that tokenization. `method="dtw"` runs the published DTW pairing
    (quadratic; for comparison only); `dtw_options` (`match`, `vocab_map`) go to
    `fusellm.method.align_dtw.dtw_pairs`.
    """
    t_ids, t_ends = token_end_chars(text, target_tokenizer, role="target", ids=target_ids)
    s_ids, s_ends = token_end_chars(text, source_tokenizer, role="source", ids=source_ids)
    if method == "offsets":
        if dtw_options:
            raise TypeError(f"options {sorted(dtw_options)} only apply to method='dtw'")
        return pair_ends(t_ends, s_ends)
    if method == "dtw":
        from fusellm.method.align_dtw import dtw_pairs, published_token_strings

        return dtw_pairs(
            published_token_strings(t_ids, target_tokenizer),
            published_token_strings(s_ids, source_tokenizer),
            **dtw_options,
        )
    raise ValueError(f"unknown alignment method {method!r}; expected 'offsets' or 'dtw'")
