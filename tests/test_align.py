import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusellm.method.align import align_positions, pair_ends, token_end_chars

PAIRS = [(a, b) for a in ("llama-spm", "mpt", "gpt-2") for b in ("llama-spm", "mpt", "gpt-2") if a != b]

FRAGMENTS = [
    "def f(x):\n", "    return x + 1\n", "\t", "  ", "    ", "\n\n", " ", "if (a && b) { c++; }",
    "The quick brown fox", " jumps", "naïve café", "Ångström", "über", "日本語のテキスト", "你好，世界",
    "😀", "👍🏽", "🇫🇷", "ﬁ", "e\u0301", "x = [1, 2, 3]", "# comment", "'''doc'''", "@decorator",
    "1234567890", "3.14159", "—", "…", "\r\n", "\u00a0", "  \n  ",
]
texts = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(min_size=1, max_size=8)), min_size=1, max_size=25
).map("".join).filter(lambda s: s.strip() != "" or len(s) > 0)


def decoded_prefix(tokenizer, ids, upto):
    """The text a prefix of tokens decodes to, comparable across tokenizers.

    SentencePiece writes spaces as U+2581 and decodes every U+2581 back to a space, so a
    literal U+2581 in the text comes back as " ": both count as a space here.
    """
    text = tokenizer.decode(ids[: upto + 1], clean_up_tokenization_spaces=False)
    return unicodedata.normalize("NFC", text).replace("\u2581", " ").lstrip(" ")


def check_pairs(text, target, source):
    """Every returned pair must have contexts ending at the same character (by decoding)."""
    pairs = align_positions(text, target, source)
    t_ids = target(text, add_special_tokens=False)["input_ids"]
    s_ids = source(text, add_special_tokens=False)["input_ids"]
    assert pairs.dtype == np.int64 and len(pairs) == len(t_ids)
    good = total = 0
    for i, j in enumerate(pairs):
        if j < 0:
            continue
        total += 1
        good += decoded_prefix(target, t_ids, i) == decoded_prefix(source, s_ids, j)
    return good, total


@pytest.mark.parametrize("target,source", PAIRS)
def test_pairs_end_at_the_same_character_on_real_text(real_tokenizers, english_texts, code_texts, target, source):
    good = total = 0
    for text in [english_texts[3][:3000], english_texts[40][:3000], code_texts[5][:3000]]:
        g, t = check_pairs(text, real_tokenizers[target], real_tokenizers[source])
        good, total = good + g, total + t
    assert total > 1000
    assert good / total >= 0.999


@pytest.mark.parametrize("target,source", PAIRS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_property_random_text(real_tokenizers, target, source, text):
    if not text.strip():
        text = text + "x"
    t_tok, s_tok = real_tokenizers[target], real_tokenizers[source]
    good, total = check_pairs(text, t_tok, s_tok)
    assert good == total
    # every position that *can* be paired is paired: same context ends on both sides
    _, t_ends = token_end_chars(text, t_tok)
    _, s_ends = token_end_chars(text, s_tok)
    common = set(t_ends[t_ends >= 0]) & set(s_ends[s_ends >= 0])
    assert total == len(common)


def test_tiny_trained_tokenizers_align(tiny_tokenizers, english_texts):
    text = english_texts[7][:2000]
    good, total = check_pairs(text, tiny_tokenizers["spm"], tiny_tokenizers["bytelevel"])
    assert total > 100 and good == total


def test_identical_tokenizers_align_one_to_one(real_tokenizers):
    text = "Hello world, this is a test. 😀 ok"
    tok = real_tokenizers["gpt-2"]
    pairs = align_positions(text, tok, tok)
    ids, ends = token_end_chars(text, tok)
    expected = np.where(ends >= 0, np.arange(len(ids)), -1)
    np.testing.assert_array_equal(pairs, expected)
    assert (pairs == -1).sum() == 1  # the token that stops inside the emoji


def test_pair_ends_linear_merge():
    np.testing.assert_array_equal(
        pair_ends(np.array([1, 3, -1, 5, 9]), np.array([2, 3, 5, -1, 7])), [-1, 1, -1, 2, -1]
    )


def test_errors(real_tokenizers, tiny_tokenizers):

    llama, mpt = real_tokenizers["llama-spm"], real_tokenizers["mpt"]
    with pytest.raises(ValueError, match="empty"):
        align_positions("", llama, mpt)
    with pytest.raises(ValueError, match="unknown alignment method"):
        align_positions("abc", llama, mpt, method="magic")
    with pytest.raises(ValueError, match="source ids do not match the text"):
        align_positions("hello world", llama, mpt, source_ids=[1, 2, 3])
    ok = mpt("hello world", add_special_tokens=False)["input_ids"]
    assert len(align_positions("hello world", llama, mpt, source_ids=ok)) > 0


def test_slow_tokenizer_is_refused(tmp_path, real_tokenizers):
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="slow .*use_fast=True"):
        align_positions("abc", Slow(), real_tokenizers["mpt"])


@pytest.mark.parametrize("target,source", [("llama-spm", "mpt"), ("mpt", "gpt-2")])
def test_pairs_at_least_as_many_correct_positions_as_published_dtw(real_tokenizers, english_texts, code_texts, target, source):
    t_tok, s_tok = real_tokenizers[target], real_tokenizers[source]
    for text in (english_texts[11][:1200], code_texts[2][:1200]):
        _, t_ends = token_end_chars(text, t_tok)
        _, s_ends = token_end_chars(text, s_tok)

        ours = align_positions(text, t_tok, s_tok)
        dtw = align_positions(text, t_tok, s_tok, method="dtw")
        ours_ok = ours >= 0
        assert (t_ends[ours_ok] == s_ends[ours[ours_ok]]).all()
        dtw_ok = dtw >= 0
        dtw_correct = int(((t_ends[dtw_ok] == s_ends[dtw[dtw_ok]]) & (t_ends[dtw_ok] >= 0)).sum())
        assert int(ours_ok.sum()) >= dtw_correct > 0
