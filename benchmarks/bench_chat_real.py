"""Conversations on the three real checkpoints: what the chat data path costs and what it aligns.

Pivot SmolLM2-135M-Instruct (its own ChatML template); sources SmolLM2 itself, Qwen2.5-Coder-
0.5B-Instruct (its own ChatML template, another tokenizer) and Gemma-3-270M (a base checkpoint
without a template: the config gives it Gemma's turn format). The corpus is the demo's
conversations (`fusellm.demo.chat`: standard-library functions asked for by their docstrings,
language-reference topics explained), `--conversations` of the fusion split.

Two fusions up to the fused data, in this process: the conversations (`corpus.format: chat`),
and, as the baseline, the same assistant answers as plain documents. Printed per source: the
aligned coverage of the positions the sources speak for, the MinCE win rate, and the share of
top-1 ids with an exact vocabulary map; per model the extraction's mean CE over the trained
positions (chat) and over every position (text); the extraction's wall time per token of the
chat run over the text run's (the cost of rendering and of the template tokens, which are
extracted but not trained); and the share of chat tokens in the loss.

    .venv/bin/python benchmarks/bench_chat_real.py                    # 24 conversations
    .venv/bin/python benchmarks/bench_chat_real.py --conversations 8  # quicker

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import emit

from fusellm.config import parse_fusion_config
from fusellm.data.store import open_topk
from fusellm.demo.chat import conversations, write_chat_corpus
from fusellm.demo.real import GEMMA_CHAT_TEMPLATE, real_sources
from fusellm.stages import pipeline
from fusellm.stages.pipeline import Executor


def config(models: dict[str, Path], corpus: Path, workdir: Path, chat: bool):
    gemma = {"uri": str(models["gemma3"]), "name": "gemma3"}
    if chat:
        gemma["chat_template"] = GEMMA_CHAT_TEMPLATE
    return parse_fusion_config({
        "name": "bench-chat-real",
        "target": {"uri": str(models["smollm2"])},
        "sources": [{"uri": str(models["smollm2"]), "name": "smollm2"},
                    {"uri": str(models["qwen-coder"]), "name": "qwen-coder"}, gemma],
        "corpus": {"uri": str(corpus), "format": "chat" if chat else "text"},
        "pieces": {"block_size": 1024, "margin": 8},
        "extraction": {"top_k": 10, "batch_size": 2, "shard_size": 64, "device": "cpu"},
        "fusion": {"workers": 1},
        "workdir": str(workdir),
    })  # fmt: skip


def run(cfg) -> dict:
    """Pieces, then extraction (timed), then vocabulary maps and fusion; the numbers."""
    pipeline.walk(cfg, Executor(), until="prepare")
    started = time.perf_counter()
    f = pipeline.walk(cfg, Executor(), until="extract")
    extract_s = time.perf_counter() - started
    f = pipeline.walk(cfg, Executor(), until="align_fuse")
    tokens = trained = 0
    ce = {}
    for m in f.models:
        store = open_topk(f.stores[m.identity].path / "store")
        records = list(store)
        tokens += sum(len(r) for r in records)
        trained += sum(int(r.trained.sum()) for r in records if r.trained is not None)
        ce[m.name] = round(sum(r.ce for r in records) / len(records), 4)
    stats = f.fused_data.info["sources_stats"]
    return {
        "extract_s": round(extract_s, 1),
        "tokens": tokens,
        "trained_share": round(trained / tokens, 3) if trained else None,
        "ce": ce,
        "sources": {
            name: {k: round(s[k], 3) for k in
                   ("aligned_coverage", "min_ce_win_rate", "exact_map_rate_top1")}
            for name, s in stats.items() if not s["same_as_target"]
        },
    }  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None, help="keep the work folders here")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fusellm-bench-chat-"))
    models = real_sources()
    convs = conversations("fusion", limit=args.conversations)
    chat_corpus = write_chat_corpus(out / "chat-corpus", convs)
    text_corpus = out / "text-corpus"
    text_corpus.mkdir(parents=True, exist_ok=True)
    answers = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    (text_corpus / "answers.jsonl").write_text(
        "".join(json.dumps({"text": a}, ensure_ascii=False) + "\n" for a in answers)
    )
    chat = run(config(models, chat_corpus, out / "chat", chat=True))
    text = run(config(models, text_corpus, out / "text", chat=False))
    ratio = (chat["extract_s"] / chat["tokens"]) / (text["extract_s"] / text["tokens"])
    for name in chat["sources"]:
        c, t = chat["sources"][name], text["sources"][name]
        print(f"{name:>12}: coverage chat {c['aligned_coverage']:.3f} / text "
              f"{t['aligned_coverage']:.3f}; MinCE wins {c['min_ce_win_rate']:.3f} / "
              f"{t['min_ce_win_rate']:.3f}; exact top-1 {c['exact_map_rate_top1']:.3f}")  # fmt: skip
    print(
        f"extraction seconds per token, chat over text: {ratio:.2f}; "
        f"{chat['trained_share']:.0%} of the chat tokens are trained"
    )
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    result = {"conversations": len(convs), "extract_time_per_token_ratio": round(ratio, 3),
              "chat": chat, "text": text}  # fmt: skip
    emit(result)
    return result


if __name__ == "__main__":
    main()
