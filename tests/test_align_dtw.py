"""The published DTW token pairing, on hand-made token lists whose right pairing is known."""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np
import pytest
from conftest import TOKENIZER_DIR as TOKENIZERS
from hypothesis import given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Levenshtein
from transformers import AutoTokenizer

from fusellm.method.align_dtw import (
    MARKER,
    dtw_cost_matrix,
    dtw_pairs,
    dtw_target_to_sources,
    published_token_strings,
    word_markers,
)
from fusellm.testing.tiny import train_tokenizer


def context_ends(tokens: list[str]) -> list[int]:
    """Character where each hand-made token's context ends (markers count as one space)."""
    return list(itertools.accumulate(len(t) for t in tokens))


@pytest.fixture(scope="module")
def real():
    if not TOKENIZERS.is_dir():
        pytest.skip(f"real tokenizer vocabularies not found at {TOKENIZERS}")
    return {n: AutoTokenizer.from_pretrained(TOKENIZERS / n) for n in ("llama-spm", "mpt", "gpt-2")}


# --- dtw_pairs on hand-made tokens -------------------------------------------------------------


def test_identical_tokenizations_pair_one_to_one():
    tokens = ["▁The", "▁cat", "▁sat", "▁on", "▁the", "▁mat", "."]
    for match in ("path", "hard"):
        pairs = dtw_pairs(tokens, list(tokens), match=match)
        assert pairs.dtype == np.int64
        np.testing.assert_array_equal(pairs, np.arange(len(tokens)))


def test_repeated_tokens_break_ties_on_the_diagonal():
    # All paths cost 0; the published walk prefers the diagonal, so each "a" meets its twin.
    np.testing.assert_array_equal(dtw_pairs(["a", "a"], ["a", "a"], match="path"), [0, 1])


def test_ties_off_the_diagonal_prefer_the_source_step():
    # Two optimal paths; the published order [diagonal, source step, target step] picks the one
    # where target 2 meets two source tokens (-1) and targets 0 and 1 share source 0.
    target, source = ["a", "b", "ab"], ["b", "aa", "b"]
    sources = dtw_target_to_sources(dtw_cost_matrix(source, target))
    assert sources == [[0], [0], [1, 2]]
    np.testing.assert_array_equal(dtw_pairs(target, source, match="path"), [0, 0, -1])


def test_split_target_token_many_to_one():
    target = ["▁walk", "ing", "▁home"]
    source = ["▁walking", "▁home"]
    # Each target piece meets the one source token, so the path pairs both with it ...
    np.testing.assert_array_equal(dtw_pairs(target, source, match="path"), [0, 0, 1])
    # ... and the published hard check keeps only identical strings.
    np.testing.assert_array_equal(dtw_pairs(target, source), [-1, -1, 1])


def test_split_source_token_one_to_many_gets_nothing():
    target = ["▁walking", "▁home"]
    source = ["▁walk", "ing", "▁home"]
    for match in ("path", "hard"):
        np.testing.assert_array_equal(dtw_pairs(target, source, match=match), [-1, 2])


def test_edit_distance_drags_pieces_onto_the_next_word():
    # "able" is closer to "story" (5 edits) than to "unbelievable" (8), so the path moves early:
    # the piece is paired with the next word, and "▁story" then meets two source tokens.
    target = ["▁unbelievable", "▁story"]
    source = ["▁un", "believ", "able", "▁story"]
    assert dtw_target_to_sources(dtw_cost_matrix(source, target)) == [[0, 1], [2, 3]]
    np.testing.assert_array_equal(dtw_pairs(target, source), [-1, -1])  # "▁story" is lost
    pieces = ["▁un", "believ", "able", "▁story"]
    np.testing.assert_array_equal(
        dtw_pairs(pieces, ["▁unbelievable", "▁story"], match="path"), [0, 0, 1, 1]
    )


def test_first_token_gets_the_missing_marker_as_published():
    # Llama adds a prefix space to the first word, byte-level BPE does not.
    target, source = ["▁Hello", "▁world"], ["Hello", "▁world"]
    np.testing.assert_array_equal(dtw_pairs(target, source), [0, 1])
    # Only at position 0: elsewhere a missing marker means a different token.
    np.testing.assert_array_equal(dtw_pairs(["▁a", "▁(", "b"], ["▁a", "(", "b"]), [0, -1, 2])


def test_shifted_pair_shows_the_published_off_by_one():
    # "Mississippi": target ends after M|iss|iss|ippi, source after M|iss|issippi.
    target = ["▁M", "iss", "iss", "ippi"]
    source = ["▁M", "iss", "issippi"]
    pairs = dtw_pairs(target, source)  # published hard check: identical strings only
    np.testing.assert_array_equal(pairs, [0, 1, 1, -1])
    t_end, s_end = context_ends(target), context_ends(source)
    # Target 2 ("▁Mississ") borrows the distribution of source 1 ("▁Miss"): three characters early.
    assert t_end[2] == 8 and s_end[pairs[2]] == 5
    # A position whose context does end with a source token's (target 3, source 2) goes unpaired.
    assert t_end[3] == s_end[2]
    # Without the string check the path pairs shifted positions too.
    loose = dtw_pairs(["▁b", "b", "a"], ["▁b", "ba"], match="path")
    np.testing.assert_array_equal(loose, [0, 0, 1])
    assert context_ends(["▁b", "b", "a"])[1] != context_ends(["▁b", "ba"])[0]


def test_soft_match_accepts_what_the_vocabulary_map_sends_to_the_target():
    target = ["▁M", "iss", "iss", "ippi"]
    source = ["▁M", "iss", "issippi"]
    np.testing.assert_array_equal(dtw_pairs(target, source, match="path"), [0, 1, 1, 2])
    # The paper's runs: a source token the MinED map sends to the target token also lends its
    # distribution; the shifted pair at target 2 stays.
    soft = dtw_pairs(target, source, match="soft", vocab_map={"issippi": "ippi"})
    np.testing.assert_array_equal(soft, [0, 1, 1, 2])
    other = dtw_pairs(target, source, match="soft", vocab_map={"issippi": "iss"})
    np.testing.assert_array_equal(other, [0, 1, 1, -1])


def test_empty_and_bad_arguments():
    assert dtw_pairs([], ["a"]).shape == (0,)
    np.testing.assert_array_equal(dtw_pairs(["a", "b"], []), [-1, -1])
    with pytest.raises(ValueError, match="match must be"):
        dtw_pairs(["a"], ["a"], match="fuzzy")
    with pytest.raises(ValueError, match="vocab_map"):
        dtw_pairs(["a"], ["a"], match="soft")


@cache
def _best_cost(source: tuple[str, ...], target: tuple[str, ...], i: int, j: int) -> float:
    """Cheapest warping path from (0, 0) to (i, j), by plain recursion (independent of the DP)."""
    here = Levenshtein.distance(source[i].replace(MARKER, ""), target[j].replace(MARKER, ""))
    if i == 0 and j == 0:
        return here
    before = []
    if i > 0:
        before.append(_best_cost(source, target, i - 1, j))
    if j > 0:
        before.append(_best_cost(source, target, i, j - 1))
    if i > 0 and j > 0:
        before.append(_best_cost(source, target, i - 1, j - 1))
    return here + min(before)


token = st.text(alphabet="ab▁", min_size=0, max_size=3)


@settings(max_examples=150, deadline=None)
@given(st.lists(token, min_size=1, max_size=6), st.lists(token, min_size=1, max_size=6))
def test_walk_is_a_cheapest_monotone_path(target, source):
    sources = dtw_target_to_sources(dtw_cost_matrix(source, target))
    cells = [(i, j) for j, rows in enumerate(sources) for i in rows]
    # A warping path: starts at (0, 0), ends at (m-1, n-1), moves by single steps.
    ordered = sorted(cells, key=lambda c: (c[1], c[0]))
    assert ordered[0] == (0, 0) and ordered[-1] == (len(source) - 1, len(target) - 1)
    for (i0, j0), (i1, j1) in itertools.pairwise(ordered):
        assert (i1 - i0, j1 - j0) in {(1, 0), (0, 1), (1, 1)}
    cost = sum(
        Levenshtein.distance(source[i].replace(MARKER, ""), target[j].replace(MARKER, ""))
        for i, j in cells
    )
    assert cost == _best_cost(tuple(source), tuple(target), len(source) - 1, len(target) - 1)
    pairs = dtw_pairs(target, source, match="path")
    assert [int(p) for p in pairs] == [rows[0] if len(rows) == 1 else -1 for rows in sources]


# --- published_token_strings on real and tiny tokenizers ---------------------------------------


def test_markers_come_from_the_tokenizer_pipeline(real):
    assert word_markers(real["llama-spm"]) == ["▁"]
    assert word_markers(real["mpt"]) == ["Ġ"]
    assert word_markers(real["gpt-2"]) == ["Ġ"]


def test_published_strings_on_real_vocabularies(real):
    text = "Hello world,\nthe (cat) sat."
    strings = {}
    for name, tok in real.items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        strings[name] = published_token_strings(ids, tok)
        assert len(strings[name]) == len(ids)
        assert not any("Ġ" in s for s in strings[name])
    assert strings["llama-spm"][:2] == ["▁Hello", "▁world"]
    assert strings["mpt"][:2] == ["Hello", "▁world"]
    # Only the space marker is rewritten, as published: newlines keep each vocabulary's spelling.
    assert "<0x0A>" in strings["llama-spm"]
    assert any(s.startswith("Ċ") for s in strings["mpt"])
    # Real Llama vs MPT: every pair the hard check keeps joins identical strings.
    t, s = strings["llama-spm"], strings["mpt"]
    pairs = dtw_pairs(t, s)
    kept = np.flatnonzero(pairs >= 0)
    assert kept.size >= len(t) // 2
    assert all(t[i] == s[pairs[i]] or (i == 0 and t[0] == MARKER + s[pairs[0]]) for i in kept)


def test_same_tokenizer_on_real_text_pairs_one_to_one(real):
    tok = real["llama-spm"]
    ids = tok("The quick brown fox jumps over the lazy dog. " * 3, add_special_tokens=False)[
        "input_ids"
    ]
    strings = published_token_strings(ids, tok)
    np.testing.assert_array_equal(dtw_pairs(strings, strings), np.arange(len(strings)))


def test_out_of_vocabulary_id_is_named(real):
    tok = real["llama-spm"]
    with pytest.raises(ValueError, match="token id 40000 is outside the vocabulary"):
        published_token_strings([1, 40000], tok)


def test_tiny_tokenizers_of_each_family():
    texts = ["the cat sat on the mat", "a dog ran in the park", "the end"] * 5
    spm = train_tokenizer(texts, kind="spm", vocab_size=300)
    byte_level = train_tokenizer(texts, kind="bytelevel", vocab_size=300)
    wordpiece = train_tokenizer(texts, kind="wordpiece", vocab_size=100)
    assert word_markers(spm) == ["▁"]
    assert word_markers(byte_level) == ["Ġ"]
    assert word_markers(wordpiece) == []  # WordPiece drops spaces: nothing to rewrite
    ids = byte_level("the cat", add_special_tokens=False)["input_ids"]
    assert "".join(published_token_strings(ids, byte_level)) == "the▁cat"
    ids = wordpiece("the cat", add_special_tokens=False)["input_ids"]
    assert published_token_strings(ids, wordpiece) == wordpiece.convert_ids_to_tokens(ids)
