"""Pieces on the real Llama-2, MPT and GPT-2 vocabularies: exact cover, every piece fits every model."""

from __future__ import annotations

import logging
import random

import pytest
from conftest import TOKENIZER_DIR as TOKENIZERS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from fusellm.data.pieces import PiecesTally, cut_pieces, iter_pieces

NAMES = ("llama-spm", "mpt", "gpt-2")


@pytest.fixture(scope="module")
def tokenizers():
    missing = [n for n in NAMES if not (TOKENIZERS / n / "tokenizer.json").is_file()]
    if missing:
        pytest.skip(f"real tokenizer vocabularies not found under {TOKENIZERS}: {missing}")
    return [AutoTokenizer.from_pretrained(TOKENIZERS / n) for n in NAMES]


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])


def check(text: str, pieces: list[str], tokenizers, limit: int) -> None:
    assert "".join(pieces) == text
    assert all(pieces)
    for tok in tokenizers:
        worst = max(n_tokens(tok, p) for p in pieces)
        assert worst <= limit, f"{tok.name_or_path}: a piece has {worst} > {limit} tokens"


# Text that stresses tokenizers at cut points: code, whitespace runs, CJK, emoji, accents.
PARTS = st.sampled_from(
    [
        "def f(x):\n",
        "    return x + 1\n",
        "\t",
        "  ",
        "    ",
        "\n",
        "\n\n",
        "\r\n",
        " ",
        "the",
        " quick",
        " brown",
        "fox",
        "jumps",
        "über",
        "café",
        "naïve",
        "日本語",
        "中文字符",
        "한국어",
        "😀",
        "🎉🎉",
        "👩‍👩‍👧",
        "{",
        "}",
        "[]",
        "();",
        "==",
        "->",
        "0x1F",
        "3.14159",
        "\u00a0",
        "\u200b",
    ]
)
TEXT = st.lists(st.one_of(PARTS, st.text(min_size=1, max_size=6)), min_size=1, max_size=120).map(
    "".join
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=TEXT, block=st.sampled_from([8, 12, 24, 64]), margin=st.sampled_from([0, 2]))
def test_random_text_is_covered_and_fits(tokenizers, text, block, margin):
    if block - margin < 8:
        block = 8 + margin
    pieces = cut_pieces([text], tokenizers, block_size=block, margin=margin, progress=False)
    if not text.strip():
        assert pieces == []
    else:
        check(text, pieces, tokenizers, block - margin)


def _code(rng: random.Random, lines: int) -> str:
    names = ["alpha", "beta", "tokens", "offsets", "logits", "manifest", "piece", "x"]
    out = []
    for _ in range(lines):
        indent = "    " * rng.randrange(4)
        a, b = rng.choice(names), rng.choice(names)
        out.append(
            rng.choice(
                [
                    f"{indent}{a} = {b}[{rng.randrange(100)}:{rng.randrange(100)}]\n",
                    f"{indent}def {a}_{b}(self, {b}: int = {rng.randrange(9)}) -> list[str]:\n",
                    f"{indent}return {{{a!r}: {b}}}  # {rng.random():.3f}\n",
                    "\n",
                    f'{indent}"""Docstring about {a} and {b}."""\n',
                ]
            )
        )
    return "".join(out)


def _long_text(n_chars: int, seed: int = 0) -> str:
    """Prose, code, CJK with emoji and whitespace runs, in random chunks (deterministic in seed)."""
    rng = random.Random(seed)
    prose = "Fusion transfers knowledge from several source models into one target. " * 50
    chunks = [_code(rng, 400), prose, "日本語のテキストと絵文字😀を混ぜる。" * 40, " \t  \n" * 30]
    out, size = [], 0
    while size < n_chars:
        c = rng.choice(chunks)
        start = rng.randrange(len(c))
        out.append(c[start : start + rng.randrange(200, 3000)])
        size += len(out[-1])
    return "".join(out)[:n_chars]


def test_long_texts_at_paper_block_size(tokenizers):
    texts = [_long_text(60_000, seed) for seed in range(3)]
    tally = PiecesTally()
    pieces = iter_pieces(texts, tokenizers, block_size=2048, margin=48, tally=tally, progress=False)
    pieces = iter(list(pieces))
    assert tally.texts == 3 and tally.dropped_empty == 0
    for text in texts:
        got, covered = [], 0
        while covered < len(text):
            got.append(next(pieces))
            covered += len(got[-1])
        check(text, got, tokenizers, 2000)
        # Greedy: every piece but the last uses most of the budget of its tightest tokenizer.
        for piece in got[:-1]:
            assert max(n_tokens(t, piece) for t in tokenizers) > 0.7 * 2000
    assert next(pieces, None) is None


class CountingTokenizer:
    """Forwards to a real tokenizer and counts how many characters it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.chars, self.is_fast = tok, 0, tok.is_fast

    def __call__(self, texts, **kw):
        self.chars += sum(map(len, texts)) if isinstance(texts, list) else len(texts)
        return self.tok(texts, **kw)


def test_linear_work_no_retokenizing_the_whole_text_per_piece(tokenizers):
    text = _long_text(100_000, seed=7)
    counting = [CountingTokenizer(t) for t in tokenizers]
    pieces = cut_pieces([text], counting, block_size=256, margin=16, progress=False)
    assert len(pieces) > 100
    for c in counting:
        # Once for the cut, once to verify each piece, plus the few re-cut pieces.
        assert c.chars < 2.5 * len(text), f"{c.chars} characters tokenized for {len(text)}"


def test_cuts_prefer_line_ends(tokenizers):
    lines = [f"    value_{i} = compute({i}, scale={i % 7})  # step {i}\n" for i in range(400)]
    text = "".join(lines)
    pieces = cut_pieces([text], tokenizers, block_size=128, margin=8, progress=False)
    check(text, pieces, tokenizers, 120)
    assert all(p.endswith("\n") for p in pieces)


def test_no_whitespace_falls_back_to_token_boundaries(tokenizers):
    text = "日本語のテキスト" * 300 + "a" * 3000 + "😀" * 200
    pieces = cut_pieces([text], tokenizers, block_size=64, margin=0, progress=False)
    check(text, pieces, tokenizers, 64)


def test_recut_when_context_changes_tokenization(tokenizers):
    rng = random.Random(1)
    alphabet = list("abcdefghij xyz\n\t   ()[]{};:=+-*/日本語中文字😀🎉éü")
    text = "".join(rng.choice(alphabet) for _ in range(3000))
    tally = PiecesTally()
    pieces = list(iter_pieces([text], tokenizers, block_size=10, margin=0, tally=tally, progress=False))
    assert tally.recut > 0  # SentencePiece's leading "▁" makes some first cuts too long
    check(text, pieces, tokenizers, 10)


def test_empty_texts_dropped_and_counted(tokenizers, caplog):
    caplog.set_level(logging.INFO, logger="fusellm.data.pieces")
    tally = PiecesTally()
    texts = ["", "  \n\t ", "real text", "\u3000"]
    assert list(iter_pieces(texts, tokenizers, tally=tally, progress=False)) == ["real text"]
    assert (tally.texts, tally.dropped_empty) == (4, 3)
    assert "dropped 3 empty or whitespace-only texts of 4" in caplog.text


def test_bad_arguments(tokenizers):
    with pytest.raises(ValueError, match="at least 8"):
        cut_pieces(["x"], tokenizers, block_size=10, margin=5)
    with pytest.raises(ValueError, match="block_size must be > 0"):
        cut_pieces(["x"], tokenizers, block_size=0)
    with pytest.raises(ValueError, match="at least one tokenizer"):
        cut_pieces(["x"], [])

    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="not a fast tokenizer"):
        cut_pieces(["x"], [tokenizers[0], Slow()])
    with pytest.raises(TypeError, match="text #1 is bytes"):
        cut_pieces(["ok", b"bytes"], tokenizers, progress=False)


def test_locally_trained_tokenizer_families():
    """WordPiece drops whitespace (no token covers it) and NFC-normalises: offsets still cut right."""
    from fusellm.testing.tiny import train_tokenizer

    corpus = [_long_text(3000, seed) for seed in range(4)]
    toks = [
        train_tokenizer(corpus, kind=k, vocab_size=400) for k in ("spm", "bytelevel", "wordpiece")
    ]
    text = _long_text(20_000, seed=11) + " cafe\u0301 e\u0301te\u0301 "  # decomposed accents
    pieces = cut_pieces([text], toks, block_size=100, margin=4, progress=False)
    check(text, pieces, toks, 96)


def _many_texts(n: int) -> list[str]:
    rng = random.Random(5)
    texts = [_long_text(rng.randrange(50, 1500), seed) for seed in range(n)]
    texts[7] = texts[300] = "  \n"  # dropped, counted the same way in both
    return texts


def test_parallel_cutting_gives_the_same_pieces_in_the_same_order(tokenizers):
    texts = _many_texts(420)  # 7 batches: more than the 2 x 2 in flight, so the pool runs
    serial, parallel = PiecesTally(), PiecesTally()
    one = list(iter_pieces(texts, tokenizers, 96, 8, tally=serial, progress=False))
    two = list(iter_pieces(texts, tokenizers, 96, 8, tally=parallel, progress=False, workers=2))
    assert len(one) > len(texts)
    assert two == one
    assert (parallel.texts, parallel.dropped_empty, parallel.recut) == (
        serial.texts,
        serial.dropped_empty,
        serial.recut,
    )
    assert serial.texts == 420 and serial.dropped_empty >= 2


def test_parallel_cutting_streams(tokenizers):
    """Texts are read a few batches ahead of the pieces handed on, never the whole corpus."""
    from fusellm.data.pieces import BATCH

    texts = _many_texts(1000)
    read = 0

    def stream():
        nonlocal read
        for text in texts:
            read += 1
            yield text

    pieces = iter_pieces(stream(), tokenizers, 96, 8, progress=False, workers=2)
    next(pieces)
    assert read <= 6 * BATCH < len(texts)  # the window of 4 batches, the next one, and slack
    rest = list(pieces)
    assert read == len(texts) and len(rest) > len(texts)
