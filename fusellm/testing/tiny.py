"""Tiny tokenizers and causal LMs built locally, for tests, benchmarks and the demo.

Nothing here downloads anything: tokenizers are trained with the `tokenizers` library on text we
pass in, and models are small random-weight configurations of real Hugging Face architectures.
Three tokenizer families cover what real models use: SentencePiece-style BPE with the "▁" word
marker and byte fallback (Llama), byte-level BPE (GPT-2, GPT-NeoX, MPT) and WordPiece (BERT).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

TokenizerKind = Literal["spm", "bytelevel", "wordpiece"]
Architecture = Literal["llama", "gpt_neox", "gpt2"]


def _byte_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def _train_spm(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Llama-style: BPE over "▁"-marked words, 256 byte-fallback tokens as ordinary vocabulary."""
    specials = ["<unk>", "<s>", "</s>"]
    # Learn merges within words (as SentencePiece does), then tokenize unsplit, as Llama's does.
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    n_fixed = len(specials) + 256
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - n_fixed, 2), special_tokens=specials, show_progress=False
    )
    draft.train_from_iterator(texts, trainer)
    state = json.loads(draft.to_str())["model"]
    learned = sorted(
        (tid, tok) for tok, tid in state["vocab"].items() if tok not in specials
    )
    vocab = {tok: i for i, tok in enumerate(specials + _byte_tokens())}
    for _, tok in learned:
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def train_tokenizer(
    texts: Iterable[str], kind: TokenizerKind = "spm", vocab_size: int = 1000
) -> PreTrainedTokenizerFast:
    """Train a small tokenizer of one of the three families used by real models."""
    texts = list(texts)
    if kind == "spm":
        return _train_spm(texts, vocab_size)
    if kind == "bytelevel":
        eos = "<|endoftext|>"
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[eos],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos
        )
    if kind == "wordpiece":
        specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            bos_token="[CLS]",
            eos_token="[SEP]",
            pad_token="[PAD]",
        )
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'spm', 'bytelevel' or 'wordpiece'")


def tiny_config(
    architecture: Architecture,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 2048,
):
    """A small config of a real architecture whose vocabulary matches `tokenizer`."""
    vocab = len(tokenizer)
    common = {
        "vocab_size": vocab,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    # One branch per architecture, alike on purpose: each spells the same sizes its own way.
    if architecture == "llama":
        return LlamaConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            **common,
        )
    if architecture == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
            **common,
        )
    if architecture == "gpt2":
        return GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, **common
        )
    raise ValueError(
        f"unknown architecture {architecture!r}; expected 'llama', 'gpt_neox' or 'gpt2'"
    )


def tiny_model(
    architecture: Architecture, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **sizes
):
    """A random-weight causal LM of `architecture` sized for CPU tests (deterministic in `seed`)."""
    config = tiny_config(architecture, tokenizer, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


def save_tiny(model, tokenizer, path: str | Path) -> Path:
    """Save a model folder (safetensors weights + tokenizer) loadable with from_pretrained."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
