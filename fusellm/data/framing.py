"""How each model sees a piece: the tokens around the text that mark a document (docs/design.md §2.2).

A model scores text best the way it met documents in pretraining. Llama-2 and Gemma were trained
on `<bos> document <eos>`; SmolLM2 and Qwen on documents joined by `<|endoftext|>`, so a document
starts after that separator. Without its start token Gemma 3 loses 1.4 nats per token on the
first piece of real text (18 nats on the first position), and MinCE never picks it.

Instruct checkpoints name a chat-turn marker as their EOS (`<|im_end|>`, `<end_of_turn>`,
`<|eot_id|>`): ending a plain document with it would teach the target to close a chat turn after
every document. So the frame of a piece is:

- start: the tokenizer's BOS when it has one that is not a chat marker; else the document
  separator (what precedes a document in a packed pretraining stream); `none` leaves it out;
- end: the tokenizer's EOS unless it is a chat marker; else the first document separator the
  vocabulary has (`<|endoftext|>`, `<|end_of_text|>`, `<eos>`, `</s>`).

Both can be set per model in the config (`document_start`, `document_end`: `auto`, a token
string, or `none` for the start). lm-eval conditions its perplexity windows on the same start
token (its `prefix_token_id`), so extraction and evaluation score a text alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

AUTO = "auto"
NONE = "none"

# Special tokens that open or close a chat turn, not a document (ChatML, Gemma, Llama-3, Phi).
_CHAT_MARKER = re.compile(
    r"^<\|?(im_start|im_end|start_of_turn|end_of_turn|eot_id|eom_id|start_header_id|"
    r"end_header_id|end|user|assistant|system)\|?>$"
)
# Document separators, most specific first.
_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "<eos>", "</s>", "<|eos|>")


class FramingError(ValueError):
    """A model's document start or end cannot be decided or does not exist in its vocabulary."""


def is_chat_marker(token: str | None) -> bool:
    """Is this special token a chat-turn marker rather than a document boundary?"""
    return bool(token) and bool(_CHAT_MARKER.match(token))


@dataclass(frozen=True)
class DocumentFrame:
    """The token ids a model sees before (`start`, or None) and after (`end`) a piece's text."""

    start: int | None
    end: int
    start_token: str | None
    end_token: str

    @property
    def prefix(self) -> int:
        """How many tokens stand before the text (0 or 1)."""
        return 0 if self.start is None else 1

    def wrap(self, text_ids) -> list[int]:
        """The ids a model reads for a piece: start, the text's own ids, end."""
        head = [] if self.start is None else [self.start]
        return [*head, *text_ids, self.end]

    def describe(self) -> dict:
        """For stage records and store manifests: which tokens frame a document."""
        return {
            "document_start": self.start_token,
            "document_start_id": self.start,
            "document_end": self.end_token,
            "document_end_id": self.end,
        }


def _token_id(tokenizer, token: str, field: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise FramingError(
            f"{field}: token {token!r} is not in the {type(tokenizer).__name__} vocabulary "
            f"({len(tokenizer)} entries)"
        )
    return int(tid)


def document_separator(tokenizer) -> str:
    """The token that ends a document: EOS unless it closes a chat turn, else a separator."""
    eos = tokenizer.eos_token
    if eos and not is_chat_marker(eos):
        return eos
    vocab = tokenizer.get_vocab()
    for token in _SEPARATORS:
        if token in vocab:
            return token
    raise FramingError(
        f"the tokenizer's EOS {eos!r} closes a chat turn and its vocabulary has no document "
        f"separator ({', '.join(_SEPARATORS)}); set document_end in the model's config"
    )


def document_frame(tokenizer, start: str = AUTO, end: str = AUTO) -> DocumentFrame:
    """The frame of `tokenizer`'s documents; `start` / `end` override `auto` (see module doc)."""
    end_token = document_separator(tokenizer) if end == AUTO else end
    if end_token == NONE:
        raise FramingError("document_end: a piece must end with a token; 'none' is not allowed")
    if start == AUTO:
        bos = tokenizer.bos_token
        start_token = bos if bos and not is_chat_marker(bos) else end_token
    else:
        start_token = None if start == NONE else start
    return DocumentFrame(
        start=None if start_token is None else _token_id(tokenizer, start_token, "document_start"),
        end=_token_id(tokenizer, end_token, "document_end"),
        start_token=start_token,
        end_token=end_token,
    )
