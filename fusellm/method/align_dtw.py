"""The published FuseLLM token alignment (dynamic time warping over token strings), for comparison.

FuseLLM's reference code pairs each target ("base") token with source ("blending") tokens by
dynamic time warping over the two token-string sequences, with the edit distance between marker-free
token strings as the cell cost: `dtw` and `transform_step_logits` in `FuseLLM/src/utils/others.py`
of https://github.com/fanqiwan/FuseLLM (driven by `FuseLLM/src/utils/token_alignment.py`). This
module is an independent re-implementation of that rule, so that `fusellm.method.align` can offer it as
`method="dtw"` and the benchmarks can measure it against our character-offset alignment.

It is the baseline, so it is deliberately kept as published: a pure Python double loop over an
(m + 1) x (n + 1) float matrix for m source and n target tokens, one Levenshtein distance per cell.
Time is O(n * m * L^2) for tokens of at most L characters and memory O(n * m): about 4 M cells
and several seconds for one 2048-token pair on one core (`benchmarks/bench_align.py`). Nothing in
it looks at character offsets, which is why it can pair a target token with a source token whose
context ends at another character (the reported off-by-one); `fusellm.method.align` aligns on offsets.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from rapidfuzz.distance import Levenshtein
from tokenizers.pre_tokenizers import ByteLevel

MARKER = "▁"
"""The word marker every token string is written with after `published_token_strings`.

The published code writes source tokens with the target's marker before comparing them; we write
both sides with SentencePiece's "▁", which names the same thing and keeps the rule symmetric.
"""

Match = Literal["path", "hard", "soft"]


def _byte_level_space() -> str:
    """The character byte-level BPE writes for a space byte ("Ġ" in GPT-2, GPT-NeoX, MPT)."""
    ((piece, _),) = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(" ")
    return piece


def _components(node: dict | None) -> list[dict]:
    """Flatten a tokenizer.json pre-tokenizer or decoder, whose "Sequence" nodes nest others."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        children = node.get("pretokenizers") or node.get("decoders") or []
        return [leaf for child in children for leaf in _components(child)]
    return [node]


_MARKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def word_markers(tokenizer) -> list[str]:
    """The strings a tokenizer's vocabulary uses for a space, read from its tokenizer.json.

    The published code keeps a class -> marker table (LlamaTokenizer "▁", GPTNeoXTokenizerFast "Ġ")
    and fails for any other class. The tokenizer's own pipeline says the same thing generically: a
    Metaspace step names its replacement, a decoder that replaces a string with " " names it, and a
    ByteLevel step implies the byte alphabet's space character. A tokenizer with none of these (e.g.
    WordPiece, which drops spaces) has no marker and its token strings are left as they are.
    """
    if tokenizer in _MARKERS:  # serialising a 50k vocabulary costs ~0.1 s; do it once
        return list(_MARKERS[tokenizer])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} has no backend_tokenizer: a fast (tokenizers-backed) "
            "tokenizer is needed to read its word marker"
        )
    state = json.loads(backend.to_str())
    markers: list[str] = []
    for step in _components(state.get("pre_tokenizer")) + _components(state.get("decoder")):
        kind = step.get("type")
        if kind == "Metaspace":
            found = step.get("replacement")
        elif kind == "Replace" and step.get("content") == " ":
            found = (step.get("pattern") or {}).get("String")
        elif kind == "ByteLevel":
            found = _byte_level_space()
        else:
            found = None
        if found and found not in markers:
            markers.append(found)
    _MARKERS[tokenizer] = markers
    return list(markers)


def published_token_strings(ids: Sequence[int], tokenizer) -> list[str]:
    """Token strings of `ids` as the published alignment compares them: word marker -> "▁".

    `ids` are vocabulary ids (no offsets needed). Each token's own space marker (see `word_markers`)
    is rewritten as `MARKER`; nothing else is canonicalised, exactly as published (byte-level
    "Ċ" stays "Ċ", byte-fallback "<0x0A>" stays "<0x0A>").
    """
    ids = [int(i) for i in ids]
    size = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise ValueError(
            f"token id {bad[0]} is outside the vocabulary of {type(tokenizer).__name__} "
            f"(size {size}); were the ids made with another tokenizer?"
        )
    markers = [m for m in word_markers(tokenizer) if m != MARKER]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    for marker in markers:
        tokens = [t.replace(marker, MARKER) for t in tokens]
    return tokens


def token_distance(a: str, b: str) -> int:
    """Edit distance between two token strings with their word markers removed (published cost)."""
    return Levenshtein.distance(a.replace(MARKER, ""), b.replace(MARKER, ""))


def dtw_cost_matrix(source: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """Accumulated DTW cost, source tokens as rows, target tokens as columns, as published.

    Cell (i, j) holds `token_distance(source i, target j)` plus the cheapest of its upper, left and
    upper-left neighbours; the border of the (m + 1) x (n + 1) matrix is infinite except the corner.
    One cost-function call per cell, as published: O(m * n) Python iterations.
    """
    matrix = np.zeros((len(source) + 1, len(target) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, s in enumerate(source):
        for j, t in enumerate(target):
            cost = token_distance(s, t)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    return matrix[1:, 1:]


def dtw_target_to_sources(matrix: np.ndarray) -> list[list[int]]:
    """Walk the warping path back from the last cell; list the source rows each target column meets.

    Ties are broken as published: the diagonal step first, then the source step, then the target
    step (the first minimum of [diagonal, up, left]). The path always ends at (0, 0).
    """
    rows, cols = matrix.shape
    i, j = rows - 1, cols - 1
    sources: list[list[int]] = [[] for _ in range(cols)]
    while i > 0 or j > 0:
        sources[j].append(i)
        diagonal = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = matrix[i - 1, j] if i > 0 else np.inf
        left = matrix[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diagonal, up, left]))
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    sources[0].append(0)
    for found in sources:
        found.reverse()
    return sources


def _same_token(
    position: int,
    target: str,
    source: str,
    match: Match,
    vocab_map: Mapping[str, str] | None,
) -> bool:
    """The published check that lets a paired source token lend its distribution.

    "path" keeps every pairing; "hard" (the published default) needs identical strings; "soft"
    (the paper's runs) also accepts a source token that the vocabulary map sends to the target
    token. At the first target position a source token without a leading marker gets one, as the
    published code does for byte-level sources (they add no prefix space, Llama does); published,
    only GPT-NeoX/GPT-2 classes get this, here every source does, since a marker-less first token
    then means the same thing whatever the class.
    """
    if match == "path":
        return True
    if position == 0 and target.startswith(MARKER) and not source.startswith(MARKER):
        source = MARKER + source
    if target == source:
        return True
    return match == "soft" and vocab_map is not None and vocab_map.get(source) == target


def _check_match(match: str, vocab_map: Mapping[str, str] | None) -> None:
    if match not in ("path", "hard", "soft"):
        raise ValueError(f"match must be 'path', 'hard' or 'soft', got {match!r}")
    if match == "soft" and vocab_map is None:
        raise ValueError(
            "match='soft' needs vocab_map (source token string -> target token string)"
        )


def check_pairs(
    pairs: np.ndarray,
    target_tokens: Sequence[str],
    source_tokens: Sequence[str],
    match: Match = "hard",
    vocab_map: Mapping[str, str] | None = None,
) -> np.ndarray:
    """Drop the pairs the published vocabulary check rejects (see `_same_token`); returns a copy."""
    _check_match(match, vocab_map)
    checked = np.array(pairs, dtype=np.int64, copy=True)
    for position in np.flatnonzero(checked >= 0):
        j = int(checked[position])
        if not _same_token(position, target_tokens[position], source_tokens[j], match, vocab_map):
            checked[position] = -1
    return checked


def dtw_pairs(
    target_tokens: Sequence[str],
    source_tokens: Sequence[str],
    match: Match = "hard",
    vocab_map: Mapping[str, str] | None = None,
) -> np.ndarray:
    """For each target token, the source token the published DTW rule pairs it with, else -1.

    Token strings come from `published_token_strings`. A target token is paired only when the
    warping path meets it at exactly one source token (one-to-one, or several target tokens on one
    source token); a target token that meets several source tokens gets -1. (The published code
    gives such positions the one-hot of the token *at* that position, although the distribution
    there predicts the *next* token; our fusion uses the next token's one-hot.) `match` then applies the published vocabulary check
    (`check_pairs`): "hard" by default, as in the published script; "soft" needs `vocab_map`
    (marker-normalised source string -> target string, e.g. the MinED map, as in the paper's
    runs); "path" skips the check. A rejected pair also gets -1.

    Complexity: O(n * m) Python iterations with one edit distance each, O(n * m) memory.
    Empty inputs, which the published code does not handle, give -1 everywhere.
    """
    _check_match(match, vocab_map)
    pairs = np.full(len(target_tokens), -1, dtype=np.int64)
    if not target_tokens or not source_tokens:
        return pairs
    sources = dtw_target_to_sources(dtw_cost_matrix(source_tokens, target_tokens))
    for position, found in enumerate(sources):
        if len(found) == 1:
            pairs[position] = found[0]
    return check_pairs(pairs, target_tokens, source_tokens, match, vocab_map)
