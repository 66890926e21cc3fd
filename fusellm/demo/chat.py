"""Conversations built from what every Python installation ships: a chat corpus with no download.

Two kinds of exchange, each a user turn and an assistant turn:

- ``code``: the user asks for a standard-library function by its signature and the first
  paragraph of its docstring; the assistant answers with the function's code (its docstring
  removed, since the question already says it).
- ``docs``: the user asks about a topic of the language reference (``pydoc_data.topics``,
  what ``help("if")`` prints); the assistant answers with the topic's opening paragraphs.

Each conversation goes to a split by the same content hash as the demo's text domains
(`fusellm.demo.data.split_of`), taken over the assistant's answer, so no answer is trained on
and then scored. Within a split conversations are in hash order, so a cap takes an even sample.
"""

from __future__ import annotations

import ast
import functools
import json
import textwrap
from pathlib import Path

from fusellm.data.chat import normalise_messages
from fusellm.demo.data import (
    DEFAULT_SPLITS,
    HELDOUT_PARTS,
    SPLITS,
    DemoSplits,
    heldout_part_of,
    split_of,
    split_position,
    stdlib_dir,
    stdlib_modules,
)

KINDS = ("code", "docs")
MAX_ANSWER_CHARS = 900  # longer functions and topics are left out (code) or cut (docs)
MIN_ANSWER_CHARS = 80


def _exchange(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _function_exchange(node, source: str) -> list[dict] | None:
    """'Write `name(args)`: <doc>' -> the function's code without its docstring, or None."""
    doc = ast.get_docstring(node, clean=True)
    if not doc or not isinstance(node.body[0], ast.Expr) or len(node.body) < 2:
        return None
    lines = source.splitlines(keepends=True)
    head = "".join(lines[node.lineno - 1 : node.body[0].lineno - 1])
    body = "".join(lines[node.body[0].end_lineno : node.end_lineno])
    code = textwrap.dedent(head + body).strip()
    if not MIN_ANSWER_CHARS <= len(code) <= MAX_ANSWER_CHARS or node.decorator_list:
        return None
    summary = doc.split("\n\n")[0].strip()
    question = f"Write the Python function `{node.name}({ast.unparse(node.args)})`: {summary}"
    return _exchange(question, code)


@functools.lru_cache(maxsize=2)
def _code_exchanges(root: Path) -> tuple[str, ...]:
    out = []
    for path in stdlib_modules(root):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a module of another Python version or encoding: not worth failing for
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                exchange = _function_exchange(node, source)
                if exchange is not None:
                    out.append(json.dumps(exchange))
    return tuple(out)


def _docs_exchanges() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        answer = ""
        for paragraph in topics[key].strip().split("\n\n"):
            if answer and len(answer) + len(paragraph) > MAX_ANSWER_CHARS:
                break
            answer = f"{answer}\n\n{paragraph}" if answer else paragraph
        if len(answer) >= MIN_ANSWER_CHARS:
            out.append(json.dumps(_exchange(f"Explain `{key}` in Python.", answer[:2000])))
    return tuple(out)


def conversations(
    split: str,
    *,
    kinds: tuple[str, ...] = KINDS,
    limit: int | None = None,
    max_bytes: int | None = None,
    max_chars: int | None = None,
    config: DemoSplits = DEFAULT_SPLITS,
    root: Path | None = None,
) -> list[list[dict]]:
    """The conversations of one split (`train`, `fusion`, `heldout`, `validation`, `test`), in
    hash order: at most `limit` of them, of at most `max_bytes` of message text together, each
    at most `max_chars` long (small models have small windows)."""
    if split not in SPLITS + HELDOUT_PARTS:
        raise ValueError(
            f"unknown split {split!r}; expected one of {', '.join(SPLITS + HELDOUT_PARTS)}"
        )
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; expected some of {list(KINDS)}")
    pool = []
    if "code" in kinds:
        pool += _code_exchanges(Path(root) if root else stdlib_dir())
    if "docs" in kinds:
        pool += _docs_exchanges()
    chosen = []
    for item in pool:
        messages = json.loads(item)
        answer = messages[-1]["content"]
        if split in (split_of(answer, config), heldout_part_of(answer, config)):
            chosen.append(
                (split_position(answer), normalise_messages(messages, "demo conversation"))
            )
    chosen.sort(key=lambda pair: pair[0])
    out, total = [], 0
    for _, messages in chosen:
        if max_chars is not None and sum(len(m["content"]) for m in messages) > max_chars:
            continue
        size = sum(len(m["content"].encode("utf-8")) for m in messages)
        if len(out) == limit or max_bytes is not None and total + size > max_bytes:
            break
        out.append(messages)
        total += size
    return out


def write_chat_corpus(folder: Path, convs: list[list[dict]]) -> Path:
    """`convs` as a JSONL chat corpus (`corpus.format: chat`) in `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".conversations.jsonl.tmp"
    tmp.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs))
    tmp.replace(folder / "conversations.jsonl")
    return folder


def reply_bits_per_byte(model, tokenizer, convs: list[list[dict]], batch_size: int = 8) -> dict:
    """Held-out score of a chat model: bits per byte of the replies, each predicted from the
    conversation before it in the model's template (the trained positions of
    `fusellm.data.chat.render`, the turn's end marker included). Conversations longer than the
    model's window are left out and counted. Returns {"bits_per_byte", "conversations",
    "skipped"}."""
    import math

    import torch

    from fusellm.data.chat import render
    from fusellm.demo.heldout import _batch_nll, model_window

    window = model_window(model)
    scored, skipped, n_bytes = [], 0, 0
    for messages in convs:
        view = render(messages, tokenizer)
        if len(view.ids) > window:
            skipped += 1
            continue
        ids = view.ids.tolist()
        targets = [ids[t + 1] if view.trained[t] else -100 for t in range(len(ids) - 1)]
        scored.append((ids[:-1], targets))
        n_bytes += view.assistant_bytes
    if not scored:
        raise ValueError(f"no conversation fits the model's window of {window} tokens")
    device = next(model.parameters()).device
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(scored), batch_size):
            chunk = scored[start : start + batch_size]
            total += _batch_nll(model, chunk, pad_id=pad, device=device)
    bits = total / math.log(2) / n_bytes
    return {"bits_per_byte": bits, "conversations": len(scored), "skipped": skipped}
