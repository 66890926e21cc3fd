"""Canonical token strings: what text each vocabulary entry stands for, whatever the tokenizer.

Tokenizers spell the same text differently: SentencePiece writes a leading space as "▁" and raw
bytes as `<0xNN>`, byte-level BPE maps every byte to a printable character ("Ġ" = space,
"Ċ" = newline), WordPiece marks word continuations with "##". To compare vocabularies we turn
every token into the bytes it contributes to decoded text, read from the tokenizer's own decoder
pipeline (never from the model's name). Bytes that are not valid UTF-8 on their own (a piece of a
multi-byte character) stay distinguishable through `surrogateescape`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SPACE_MARKER = "▁"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (byte-level BPE's printable byte alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


@dataclass(frozen=True)
class DecoderSpec:
    """The parts of a tokenizer's decoder pipeline that change a token's surface text."""

    byte_level: bool = False
    byte_fallback: bool = False
    replacements: tuple[tuple[str, str], ...] = ()
    wordpiece_prefix: str | None = None
    end_of_word_suffix: str | None = None


def decoder_spec(tokenizer) -> DecoderSpec:
    """Read the decoder pipeline from the tokenizer's serialized form (tokenizer.json)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return DecoderSpec()
    state = json.loads(backend.to_str())
    model = state.get("model") or {}
    steps = []
    stack = [state.get("decoder")]
    while stack:
        node = stack.pop(0)
        if not node:
            continue
        if node.get("type") == "Sequence":
            stack[:0] = node.get("decoders", [])
        else:
            steps.append(node)
    spec = {"replacements": []}
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            spec["byte_level"] = True
        elif kind == "ByteFallback":
            spec["byte_fallback"] = True
        elif kind == "Metaspace":
            spec["replacements"].append((step.get("replacement", SPACE_MARKER), " "))
        elif kind == "Replace":
            pattern = step.get("pattern", {})
            if "String" in pattern:
                spec["replacements"].append((pattern["String"], step.get("content", "")))
        elif kind == "WordPiece":
            spec["wordpiece_prefix"] = step.get("prefix", "##")
        elif kind == "BPEDecoder":
            spec["end_of_word_suffix"] = step.get("suffix", "</w>")
    if model.get("byte_fallback"):
        spec["byte_fallback"] = True
    spec["replacements"] = tuple(spec["replacements"])
    return DecoderSpec(**spec)


def _fallback_byte(token: str) -> int | None:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def token_bytes(token: str, spec: DecoderSpec) -> tuple[bytes, bool]:
    """(bytes the token contributes to text, whether it is a byte-fallback token)."""
    if spec.byte_fallback:
        byte = _fallback_byte(token)
        if byte is not None:
            return bytes([byte]), True
    if spec.byte_level:
        table = _byte_decoder()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token), False
    text = token
    for old, new in spec.replacements:
        text = text.replace(old, new)
    if spec.wordpiece_prefix is not None:
        if text.startswith(spec.wordpiece_prefix):
            text = text[len(spec.wordpiece_prefix) :]
        else:
            text = " " + text
    if spec.end_of_word_suffix and text.endswith(spec.end_of_word_suffix):
        text = text[: -len(spec.end_of_word_suffix)] + " "
    return text.encode("utf-8"), False


@dataclass
class Vocabulary:
    """A tokenizer's vocabulary in canonical form.

    `canonical[i]` is the surface text of id i (None for special/control tokens, which are never
    mapped by string, and for padding rows), `byte_fallback[i]` marks `<0xNN>` entries, `roles`
    maps special roles (bos, eos, unk, pad) to ids.
    """

    canonical: list[str | None]
    byte_fallback: np.ndarray
    roles: dict[str, int]

    def __len__(self) -> int:
        return len(self.canonical)


def is_padding_row(piece: str, tid: int) -> bool:
    """A placeholder for an unused row of a padded vocabulary: it stands for no text.

    Vocabularies padded to a round size (MPT's 50,432 rows for 50,277 entries) list the extra
    rows as `[PAD<id>]` once converted by llama.cpp. Read as text they would map onto "[" and
    steal probability mass; they must map nowhere, like rows past the end of the tokenizer.
    """
    return piece == f"[PAD{tid}]"


def canonical_vocabulary(tokenizer) -> Vocabulary:
    """Canonical strings for every id of `tokenizer` (including added tokens)."""
    spec = decoder_spec(tokenizer)
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special_ids = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for tid, tok in added.items():
        if getattr(tok, "special", False):
            special_ids.add(int(tid))
    canonical: list[str | None] = []
    fallback = np.zeros(size, dtype=bool)
    for tid, piece in enumerate(pieces):
        if piece is None or tid in special_ids or is_padding_row(piece, tid):
            canonical.append(None)
            continue
        if tid in added:  # added (non-special) tokens are matched literally, not decoded
            canonical.append(str(added[tid]))
            continue
        data, is_fallback = token_bytes(piece, spec)
        fallback[tid] = is_fallback
        canonical.append(data.decode("utf-8", errors="surrogateescape"))
    roles = {}
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None and 0 <= tid < size:
            roles[role] = int(tid)
    return Vocabulary(canonical, fallback, roles)
