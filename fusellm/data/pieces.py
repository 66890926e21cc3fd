"""Cut corpus texts into pieces that fit every model's context (docs/design.md §2.1).

FuseLLM feeds the *same characters* to every model: a piece is text, not token ids, and each model
tokenizes it with its own tokenizer and appends its own EOS. So a piece is only valid when *every*
tokenizer yields at most ``block_size - margin`` tokens for it (the margin leaves room for EOS and
for the few tokens a tokenizer may add at a cut, such as SentencePiece's leading "▁").

How we cut, in linear time:

1. Tokenize each text once per tokenizer, with character offsets (fast tokenizers only).
2. Walk the text greedily. From the current position, every tokenizer says how far its token budget
   reaches; the nearest reach wins, and that *most constrained* tokenizer's token boundaries are the
   candidate cut points. In the last quarter of its token budget we prefer, in order: just after a blank
   line, just after a newline, just before whitespace; otherwise the last boundary that fits.
3. Tokenization depends on context at the cut (a word cut loose gets a different split), so every
   piece is re-tokenized alone by every tokenizer; a piece that does not fit is cut again the same
   way. Each re-cut makes pieces strictly shorter, so this terminates.
4. Texts are cut independently, so batches of them are cut in several processes at once and the
   pieces handed on in corpus order: the same pieces whatever the number of workers.

Pieces are exact slices: ``"".join(pieces_of(text)) == text``. Empty and whitespace-only texts carry
nothing to learn from and are dropped, and counted.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

BATCH = 64  # texts tokenized together: amortises the Rust call and drives the progress bar
PREFER_WITHIN = 0.25  # look for a line or word end in the last quarter of the window only


@dataclass
class PiecesTally:
    """What cutting a corpus met on the way, for the stage's record and logs."""

    texts: int = 0
    dropped_empty: int = 0
    recut: int = 0  # pieces that needed a second cut after re-tokenization
    shortened: int = 0  # chat: conversations cut to their first turns to fit the block
    dropped_long: int = 0  # chat: conversations whose first exchange does not fit


@dataclass
class _Tokens:
    """One tokenizer's view of one text: token start/end characters, and where cuts are clean."""

    starts: np.ndarray
    reach: np.ndarray  # reach[i]: furthest character any of tokens 0..i covers (non-decreasing)
    clean: np.ndarray  # clean[i]: no token before i reaches past starts[i]


def _check_tokenizers(tokenizers: Sequence) -> None:
    if not tokenizers:
        raise ValueError("cut_pieces needs at least one tokenizer")
    for i, tok in enumerate(tokenizers):
        if not getattr(tok, "is_fast", False):
            raise ValueError(
                f"tokenizer #{i} ({type(tok).__name__}) is not a fast tokenizer: pieces need "
                "character offsets (return_offsets_mapping), which only fast tokenizers provide"
            )


def _limit(block_size: int, margin: int) -> int:
    if block_size <= 0 or margin < 0:
        raise ValueError(f"block_size must be > 0 and margin >= 0, got {block_size} and {margin}")
    limit = block_size - margin
    if limit < 8:
        # One character can cost 4 byte-fallback tokens plus a prefix marker: below this no cut
        # can be guaranteed to fit.
        raise ValueError(
            f"block_size - margin = {limit} tokens is too small; it must be at least 8"
        )
    return limit


def _encode(tokenizer, texts: list[str]) -> list[_Tokens]:
    """Tokenize a batch once, keeping offsets; the whole cutting works on these arrays."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    out = []
    for offsets in enc["offset_mapping"]:
        arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = arr[:, 0], arr[:, 1]
        reach = np.maximum.accumulate(ends) if len(ends) else ends
        clean = np.ones(len(starts), dtype=bool)
        clean[1:] = reach[:-1] <= starts[1:]
        out.append(_Tokens(starts, reach, clean))
    return out


def _first_token(tokens: _Tokens, pos: int) -> int:
    """Index of the first token that covers a character at or after `pos`."""
    first = int(np.searchsorted(tokens.reach, pos, side="right"))
    while first > 0 and tokens.starts[first - 1] >= pos:  # zero-width tokens at `pos` count too
        first -= 1
    return first


def _reach(tokens: _Tokens, pos: int, limit: int, length: int) -> int:
    """Furthest character a piece starting at `pos` may extend to within `limit` tokens.

    Tokens that overlap [pos, ...) are those ending after `pos`; a cut at or before the start of the
    (limit+1)-th of them keeps at most `limit` tokens on the left.
    """
    stop = _first_token(tokens, pos) + limit
    if stop >= len(tokens.starts):
        return length
    return int(tokens.starts[stop])


def _choose_cut(tokens: _Tokens, pos: int, reach: int, limit: int, text: str) -> int:
    """Pick a clean token boundary in (pos, reach], preferring line and word ends.

    The preference only looks at the last `PREFER_WITHIN` of the token budget, so every piece but
    a text's last keeps at least that much of it.
    """
    lo = int(np.searchsorted(tokens.starts, pos, side="right"))
    hi = int(np.searchsorted(tokens.starts, reach, side="right"))
    cand = tokens.starts[lo:hi][tokens.clean[lo:hi]]
    cand = cand[(cand > pos) & (cand <= reach)]
    if len(cand) == 0:
        raise ValueError(
            f"cannot cut the text at character {pos}: one character needs more tokens than the "
            "block allows; raise block_size or lower margin"
        )
    floor = tokens.starts[_first_token(tokens, pos) + limit - int(limit * PREFER_WITHIN)]
    late = cand[cand >= floor][::-1]
    for prefer in (
        lambda c: text[c - 2 : c] == "\n\n",
        lambda c: text[c - 1] == "\n",
        lambda c: text[c].isspace(),
    ):
        for c in late:
            if prefer(int(c)):
                return int(c)
    return int(cand[-1])


def _cut(text: str, views: list[_Tokens], limit: int) -> list[str]:
    """Greedy cut of one text given each tokenizer's offsets (step 2 of the module doc)."""
    pieces, pos, length = [], 0, len(text)
    while pos < length:
        reaches = [_reach(v, pos, limit, length) for v in views]
        tightest = int(np.argmin(reaches))
        reach = reaches[tightest]
        if reach >= length:
            cut = length
        else:
            cut = _choose_cut(views[tightest], pos, reach, limit, text)
        pieces.append(text[pos:cut])
        pos = cut
    return pieces


def _fits(pieces: list[str], tokenizers: Sequence, limit: int) -> list[bool]:
    ok = [True] * len(pieces)
    for tok in tokenizers:
        ids = tok(pieces, add_special_tokens=False, verbose=False)["input_ids"]
        ok = [o and len(i) <= limit for o, i in zip(ok, ids)]
    return ok


def _split_batch(texts: list[str], tokenizers: Sequence, limit: int) -> tuple[list[str], int]:
    """Cut a batch of texts, verify every piece alone (one batched call per tokenizer), re-cut
    the few that do not fit."""
    views = [_encode(tok, texts) for tok in tokenizers]
    pieces = [p for i, text in enumerate(texts) for p in _cut(text, [v[i] for v in views], limit)]
    out, recut = [], 0
    for piece, good in zip(pieces, _fits(pieces, tokenizers, limit)):
        if good:
            out.append(piece)
        else:
            recut += 1
            out.extend(_recut(piece, tokenizers, limit))
    return out, recut


def _recut(piece: str, tokenizers: Sequence, limit: int) -> list[str]:
    """Cut a piece that did not fit on its own, using its own tokenization; verify the parts."""
    views = [_encode(tok, [piece])[0] for tok in tokenizers]
    parts = _cut(piece, views, limit)
    if len(parts) < 2:  # offsets and ids disagree: cutting again would loop forever
        raise ValueError(
            f"cannot cut a piece of {len(piece)} characters ({piece[:40]!r}...) to {limit} tokens: "
            "a tokenizer's offsets do not account for all of its tokens"
        )
    out = []
    for part, good in zip(parts, _fits(parts, tokenizers, limit)):
        out.extend([part] if good else _recut(part, tokenizers, limit))
    return out


def iter_pieces(
    texts: Iterable[str],
    tokenizers: Sequence,
    block_size: int = 2048,
    margin: int = 48,
    *,
    tally: PiecesTally | None = None,
    progress: bool = True,
    workers: int = 1,
) -> Iterator[str]:
    """Pieces of `texts`, in corpus order, as a stream: memory holds a few batches of texts,
    never the corpus.

    `workers` > 1 cuts batches in that many processes at once (`_cut_parallel`); the pieces are
    the same, in the same order, as with one. `tally` counts texts, dropped empty ones and
    re-cuts.
    """
    _check_tokenizers(tokenizers)
    limit = _limit(block_size, margin)
    tally = tally if tally is not None else PiecesTally()
    batches = _batches(texts, tally)
    if workers > 1:
        results = _cut_parallel(batches, tokenizers, limit, workers)
    else:
        results = (_cut_batch(batch, tokenizers, limit) for batch in batches)
    with tqdm(desc="pieces", unit="text", disable=not progress) as bar:
        for pieces, recut, count in results:
            tally.recut += recut
            bar.update(count)
            yield from pieces
    if tally.dropped_empty:
        log.info("dropped %d empty or whitespace-only texts of %d", tally.dropped_empty, tally.texts)


def _batches(texts: Iterable[str], tally: PiecesTally) -> Iterator[list[str]]:
    """Non-empty texts in batches of `BATCH`; counts every text and every dropped one."""
    batch: list[str] = []
    for text in texts:
        tally.texts += 1
        if not isinstance(text, str):
            raise TypeError(f"text #{tally.texts - 1} is {type(text).__name__}, expected str")
        if not text.strip():
            tally.dropped_empty += 1
            continue
        batch.append(text)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _cut_batch(batch: list[str], tokenizers: Sequence, limit: int) -> tuple[list[str], int, int]:
    """(pieces, re-cuts, texts) of one batch."""
    pieces, recut = _split_batch(batch, tokenizers, limit)
    return pieces, recut, len(batch)


def _cut_parallel(
    batches: Iterator[list[str]], tokenizers: Sequence, limit: int, workers: int
) -> Iterator[tuple[list[str], int, int]]:
    """Batches cut in `workers` spawned processes, results in corpus order.

    At most ``2 * workers`` batches are in flight, so memory stays bounded however long the
    corpus. A corpus of fewer batches than that is cut here: starting processes (each imports
    transformers and unpickles the tokenizers) would cost more than the cutting.
    """
    window = 2 * workers
    head = list(itertools.islice(batches, window))
    if len(head) < window:
        yield from (_cut_batch(batch, tokenizers, limit) for batch in head)
        return
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(list(tokenizers),),
    )
    try:
        pending = deque(pool.submit(_cut_in_worker, batch, limit) for batch in head)
        for batch in batches:
            yield pending.popleft().result()  # re-raises a worker's error, e.g. an uncuttable text
            pending.append(pool.submit(_cut_in_worker, batch, limit))
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_WORKER_TOKENIZERS: list = []


def _init_worker(tokenizers: list) -> None:
    _WORKER_TOKENIZERS[:] = tokenizers


def _cut_in_worker(batch: list[str], limit: int) -> tuple[list[str], int, int]:
    return _cut_batch(batch, _WORKER_TOKENIZERS, limit)


def cut_pieces(
    texts: Iterable[str],
    tokenizers: Sequence,
    block_size: int = 2048,
    margin: int = 48,
    *,
    progress: bool = True,
) -> list[str]:
    """Pieces of text such that every tokenizer yields at most `block_size - margin` tokens each.

    Tokenized with ``add_special_tokens=False``; the margin keeps room for each model's EOS.
    Empty/whitespace-only texts are dropped (their count is logged; `iter_pieces` tallies it).
    """
    return list(iter_pieces(texts, tokenizers, block_size, margin, progress=progress))
