"""Conversations as pieces (FuseChat): every model reads a conversation in its own chat template.

A chat corpus holds records with a list of messages (``{"role": ..., "content": ...}``), as SFT
datasets do. A piece is one whole conversation, kept as canonical JSON (`conversation_piece`).
Each model renders it with its own chat template (`render`): the tokens around the messages
differ from model to model (`<|im_start|>assistant`, `<start_of_turn>model`, a default system
prompt), but the text of the messages is the same in all of them. Hence:

- **Alignment on the messages' text.** Each position's context end is moved from the rendered
  text to *canonical* offsets: the messages' contents laid end to end, each after one
  separator. A position whose context ends inside a message, or is the last one before a
  message starts, has a canonical end every model shares; the other positions in template
  text have none (unaligned).
  `fusellm.method.align.pair_ends` then pairs positions exactly as it does for plain text.
- **The loss covers assistant tokens only** (`trained`): position t is trained when token t+1
  holds text of an assistant message (SentencePiece's "▁" often carries the space before it
  into its first token), or is the first token after it (the turn's end marker, which
  teaches the model where to stop).
- **Sources only speak for assistant text** (`from_sources`): at the turn's end marker, and
  everywhere in the template, a source would predict its own template tokens, which mean
  nothing in the target's; there the target keeps the one-hot of what it really reads.

Messages are stripped of surrounding whitespace when read, because templates differ in whether
they trim (Gemma's and Llama-3's do, ChatML's do not) and the canonical text must be the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from fusellm.method.align import UNALIGNED, context_ends

ROLES = ("system", "user", "assistant")
_SLOT = "\u27e6fusellm-message-{}\u27e7"  # stands for a message while the template renders


class ChatError(ValueError):
    """A conversation or a chat template cannot be used; the message says which and why."""


def normalise_messages(messages, where: str) -> list[dict]:
    """Messages as `{"role", "content"}` with stripped text; errors name `where` (file, line)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatError(
            f"{where}: expected a non-empty list of messages, got {type(messages).__name__}"
        )
    out = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"{where}: message {n} is {type(message).__name__}, not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatError(
                f"{where}: message {n} has role {role!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise ChatError(
                f"{where}: message {n} has content of type {type(content).__name__}, not text"
            )
        out.append({"role": role, "content": content.strip()})
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        raise ChatError(f"{where}: no assistant message with text: nothing to learn from")
    return out


def conversation_piece(messages: list[dict]) -> str:
    """The canonical JSON of normalised messages: one piece, the same bytes wherever it is made."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def read_piece(piece: str) -> list[dict]:
    """The messages of a chat piece."""
    return json.loads(piece)


def check_template(tokenizer, model: str) -> None:
    """A model fused on conversations needs a chat template: its own, or one the config gives."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatError(
            f"model {model!r} has no chat template, and the corpus is conversations "
            "(corpus.format: chat); give one in its config (chat_template: a Jinja template)"
        )


@dataclass
class ChatView:
    """One model's reading of one conversation."""

    ids: np.ndarray  # int64 [T] the rendered conversation's tokens
    ends: np.ndarray  # int64 [T] canonical context end of each position, -1 where none
    trained: np.ndarray  # bool [T] position t predicts an assistant token (or its turn's end)
    from_sources: np.ndarray  # bool [T] position t predicts assistant text
    assistant_bytes: int  # UTF-8 bytes of assistant text: the unit of per-byte CE


def _rendered(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The conversation in the model's template, and where each message's text lies in it.

    The template renders placeholders, which are then replaced by the messages: the spans are
    exact whatever the template does around them (a default system prompt, role names)."""
    slots = [{**m, "content": _SLOT.format(n)} for n, m in enumerate(messages)]
    template = tokenizer.apply_chat_template(slots, tokenize=False)
    text, spans, cursor = [], [], 0
    for n, message in enumerate(messages):
        at = template.find(_SLOT.format(n), cursor)
        if at < 0:
            raise ChatError(
                f"the chat template of {type(tokenizer).__name__} drops or changes message {n} "
                f"({message['role']}); fusion needs every message's text as it is"
            )
        text.append(template[cursor:at])
        start = sum(map(len, text))
        text.append(message["content"])
        spans.append((start, start + len(message["content"])))
        cursor = at + len(_SLOT.format(n))
    text.append(template[cursor:])
    return "".join(text), spans


def render(messages: list[dict], tokenizer) -> ChatView:
    """Tokens, canonical context ends, and the trained positions of a conversation."""
    text, spans = _rendered(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    spans_of = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, stops = spans_of[:, 0], spans_of[:, 1]
    rendered_ends = context_ends(spans_of, text)  # as token_end_chars, from this one encoding
    a = np.array([s for s, _ in spans], dtype=np.int64)
    b = np.array([e for _, e in spans], dtype=np.int64)
    lengths = b - a
    canonical = np.cumsum(lengths + 1) - lengths  # content i starts after i + 1 separators
    ends = _canonical_ends(rendered_ends, a, b, canonical)
    trained = np.zeros(len(ids), dtype=bool)
    from_sources = np.zeros(len(ids), dtype=bool)
    assistant = [n for n, m in enumerate(messages) if m["role"] == "assistant"]
    for n in assistant:
        inside = np.flatnonzero((starts < b[n]) & (stops > a[n]))  # tokens holding its text
        after = np.flatnonzero(starts >= b[n])
        next_tokens = inside if not after.size else np.append(inside, after[0])
        predicting = next_tokens[next_tokens > 0] - 1  # position t predicts token t + 1
        trained[predicting] = True
        from_sources[inside[inside > 0] - 1] = True
    size = sum(len(messages[n]["content"].encode("utf-8")) for n in assistant)
    return ChatView(ids, ends, trained, from_sources, size)


def _canonical_ends(ends: np.ndarray, a: np.ndarray, b: np.ndarray, canonical: np.ndarray):
    """Rendered context ends -> canonical ones. Inside message i (a_i < e <= b_i): its place in
    the message. In the template before message i: the last such position stands for "the
    message is about to start" (c_i), whichever model's tokens carry the space or newline
    before it; the other template positions are unaligned."""
    out = np.full(len(ends), UNALIGNED, dtype=np.int64)
    real = ends >= 0
    inside = np.searchsorted(a, ends, side="left") - 1  # the last message starting before e
    ok = real & (inside >= 0)
    ok[ok] &= ends[ok] <= b[inside[ok]]
    out[ok] = canonical[inside[ok]] + ends[ok] - a[inside[ok]]
    gap = np.flatnonzero(real & ~ok)  # template positions, in order
    before = np.searchsorted(a, ends[gap], side="left")  # the message each one precedes
    last = np.append(before[1:] != before[:-1], True) & (before < len(a))
    out[gap[last]] = canonical[before[last]]
    return out


def fit_conversation(messages: list[dict], tokenizers: Sequence, limit: int) -> list[dict] | None:
    """The longest run of whole turns from the start, ending with an assistant message, that
    every tokenizer renders in at most `limit` tokens; None when not even the first fits."""
    ends = [n + 1 for n, m in enumerate(messages) if m["role"] == "assistant" and m["content"]]
    for stop in reversed(ends):
        head = messages[:stop]
        if all(len(render(head, tok).ids) <= limit for tok in tokenizers):
            return head
    return None


def iter_conversations(
    documents: Iterable[str], tokenizers: Sequence, names: Sequence[str], limit: int, tally
) -> Iterator[str]:
    """Chat pieces: each conversation whole when every model's rendering fits in `limit`
    tokens, else its longest head of whole turns that does (counted in `tally.shortened`);
    one whose first exchange is too long is dropped (`tally.dropped_long`)."""
    for tokenizer, name in zip(tokenizers, names):
        check_template(tokenizer, name)
    for document in tqdm(documents, desc="conversations", unit="conversation", mininterval=2):
        tally.texts += 1
        messages = read_piece(document)
        fitted = fit_conversation(messages, tokenizers, limit)
        if fitted is None:
            tally.dropped_long += 1
            continue
        tally.shortened += len(fitted) < len(messages)
        yield conversation_piece(fitted)
