"""Held-out bits per byte: the one likelihood that compares models with different tokenizers.

Perplexity per token rewards a tokenizer that cuts text into more, easier pieces; bits per byte
charges every model for the same characters. For each text the model sees it framed as
extraction frames a piece (`fusellm.data.framing`: its document start, the text, its document
end) and pays the negative log-likelihood of every token after the start, the end included
(ending a document is part of modelling it), so every byte of the text is predicted exactly once:

    bits/byte = sum of next-token NLL in nats / ln 2 / number of UTF-8 bytes of the texts

Texts longer than the model's window are scored in consecutive windows, each predicting its own
tokens from the ones before it inside the window (as lm-eval's rolling log-likelihood does).
Tokenization must be lossless for this to be fair; the demo's tokenizers are (byte fallback or
byte-level).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusellm.data.framing import document_frame

_DEFAULT_MAX_LENGTH = 1024


def load_local_model(path: str | Path):
    """(model in eval mode, tokenizer) from a local folder the demo built itself.

    No `ModelRef` here, unlike `fusellm.io.sources.load_model`: the demo's folders are its own,
    so there is no remote source, dtype or remote code to honour.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder: config.json is missing")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    model.eval()
    return model, tokenizer


def model_window(model) -> int:
    """The longest input the model was built for (learned position tables end there)."""
    config = model.config
    for key in ("n_positions", "max_position_embeddings", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return _DEFAULT_MAX_LENGTH


def scored_windows(ids: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows that predict ids[1:] exactly once, each at most max_length."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    windows = []
    for start in range(0, len(ids) - 1, max_length):
        targets = ids[start + 1 : start + 1 + max_length]
        windows.append((ids[start : start + len(targets)], targets))
    return windows


def _context_and_end(tokenizer) -> tuple[int, int]:
    """The document frame extraction uses (`fusellm.data.framing`): the start token conditions
    the first character, the end token is scored as the text's last prediction."""
    frame = document_frame(tokenizer)
    return (frame.start if frame.start is not None else frame.end), frame.end


@torch.inference_mode()
def text_nll(
    model,
    tokenizer,
    texts: list[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """(total next-token NLL in nats, total UTF-8 bytes) of `texts` under `model`."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_length = max_length or model_window(model)
    bos, eos = _context_and_end(tokenizer)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    windows = [w for ids in encoded for w in scored_windows([bos, *ids, eos], max_length)]
    # Longest first, ties in input order: batches of similar length, same batches every run.
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i][0]), i))
    device = next(model.parameters()).device
    total = 0.0
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="bits/byte", disable=not progress, leave=False):
        chunk = [windows[i] for i in order[start : start + batch_size]]
        total += _batch_nll(model, chunk, pad_id=eos, device=device)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return total, n_bytes


def _batch_nll(model, windows, *, pad_id: int, device) -> float:
    width = max(len(inputs) for inputs, _ in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(windows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, (inputs, target) in enumerate(windows):
        input_ids[row, : len(inputs)] = torch.tensor(inputs)
        targets[row, : len(target)] = torch.tensor(target)
        mask[row, : len(inputs)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    nll = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), targets.to(device), ignore_index=-100, reduction="none"
    )
    return float(nll.double().sum())


def bits_per_byte(model, tokenizer, texts: list[str], **options) -> float:
    """Bits per UTF-8 byte of `texts` (see the module docstring for what is counted)."""
    nats, n_bytes = text_nll(model, tokenizer, texts, **options)
    if n_bytes == 0:
        raise ValueError("bits per byte needs texts with at least one byte")
    return nats / math.log(2) / n_bytes


def bits_per_byte_table(
    models: dict[str, str | Path],
    texts: dict[str, list[str]],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """{model name: {domain: bits/byte}} for every model folder on every domain's texts."""
    table: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        model, tokenizer = load_local_model(path)
        table[name] = {}
        for domain, domain_texts in texts.items():
            table[name][domain] = bits_per_byte(
                model, tokenizer, domain_texts, batch_size=batch_size
            )
            if progress:
                tqdm.write(f"{name:>16} {domain:>12}: {table[name][domain]:.4f} bits/byte")
    return table


def best_per_domain(table: dict[str, dict[str, float]]) -> dict[str, str]:
    """{domain: name of the model with the lowest bits/byte there} (ties: first listed)."""
    domains = next(iter(table.values())).keys() if table else []
    return {d: min(table, key=lambda name: table[name][d]) for d in domains}


def print_table(table: dict[str, dict[str, float]], title: str = "held-out bits per byte") -> None:
    """A rich table of bits/byte, models as rows, domains and their mean as columns."""
    from rich.console import Console
    from rich.table import Table

    best = best_per_domain(table)
    domains = list(best)
    out = Table(title=title)
    out.add_column("model")
    for d in [*domains, "mean"]:
        out.add_column(d, justify="right")
    for name, row in table.items():
        cells = [f"[bold]{row[d]:.4f}[/]" if best[d] == name else f"{row[d]:.4f}" for d in domains]
        out.add_row(name, *cells, f"{sum(row.values()) / len(row):.4f}")
    Console().print(out)
