"""Token alignment: our character-offset pairing vs the published DTW pairing, on real vocabularies.

Target Llama-2 (SentencePiece, 32k), source MPT-7B (byte-level BPE, 50k), in tests/data/tokenizers.
Texts are real English prose (the pydoc topics that ship with Python) and real code (standard
library sources), cut to 256 ... 2048 target tokens. For each text we time

* ours: `fusellm.method.align.align_positions(method="offsets")`, tokenization included;
* baseline: tokenizing both sides, then the published pairing (`fusellm.method.align_dtw`: token strings
  with the word marker rewritten, quadratic DTW, the published "hard" string check),

median over repeats (ours, being cheap, gets 3x the repeats; DTW gets fewer at large sizes,
since it grows as n^2). A pair is *correct* when the two tokens' contexts end at the same
character (`token_end_chars`), i.e. the source distribution predicts what follows the same prefix
of the text. Besides the published default
("hard") we count the DTW path without the check ("path") and the paper's setting ("soft": the
check passes when the MinED vocabulary map sends the source token to the target token).

    .venv/bin/python benchmarks/bench_align.py                       # all sizes, ~15-30 s on 2 cores
    .venv/bin/python benchmarks/bench_align.py --sizes 256 512 --repeats 2

The last line of output is one JSON object with `speedup_<n>` = baseline time / our time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import AutoTokenizer

from fusellm.method.align import align_positions, token_end_chars
from fusellm.method.align_dtw import check_pairs, dtw_pairs, published_token_strings

DEFAULT_TOKENIZERS = Path(__file__).resolve().parents[1] / "tests" / "data" / "tokenizers"
CODE_MODULES = ("textwrap", "functools", "json.decoder", "heapq", "string", "bisect", "argparse")


def prose_corpus() -> str:
    """English documentation that ships with Python (the text behind `help()` topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def code_corpus() -> str:
    """Python source code from the standard library."""
    sources = []
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        sources.append(Path(spec.origin).read_text(encoding="utf-8"))
    return "\n\n".join(sources)


def cut_to_tokens(text: str, tokenizer, n: int) -> str:
    """The longest prefix of `text` ending on a token boundary with at most `n` tokens."""
    head = text[: 12 * n]  # tokens are well under 12 characters on average
    while True:
        enc = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= n:
            if len(enc["input_ids"]) < n and len(head) == len(text):
                raise ValueError(f"corpus too short for {n} tokens ({len(enc['input_ids'])})")
            return head
        end = enc["offset_mapping"][n - 1][1]
        head = head[: end if end < len(head) else len(head) - 1]  # always shorter: terminates


def mined_map(source_strings: set[str], target_tokenizer) -> dict[str, str]:
    """The published MinED vocabulary map, for the source strings that occur.

    Identical strings map to themselves; others to the target vocabulary entry at the smallest
    edit distance, the first in id order on ties (the published `min` over the vocabulary list).
    """
    vocab = published_token_strings(range(len(target_tokenizer)), target_tokenizer)
    known = set(vocab)
    out = {}
    for s in sorted(source_strings):
        if s in known:
            out[s] = s
        else:
            out[s] = process.extractOne(s, vocab, scorer=Levenshtein.distance)[0]
    return out


def published(text: str, target_tok, source_tok) -> tuple[np.ndarray, list[str], list[str]]:
    """The baseline: tokenize both, rewrite markers, DTW path pairs (the check is applied after)."""
    t_ids = target_tok(text, add_special_tokens=False)["input_ids"]
    s_ids = source_tok(text, add_special_tokens=False)["input_ids"]
    t_str = published_token_strings(t_ids, target_tok)
    s_str = published_token_strings(s_ids, source_tok)
    return dtw_pairs(t_str, s_str, match="path"), t_str, s_str


def timed(fn, repeats: int):
    """(median seconds, last result) over `repeats` calls."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def score(pairs: np.ndarray, t_ends: np.ndarray, s_ends: np.ndarray) -> tuple[int, int]:
    """(pairs whose two contexts end at the same character, pairs returned)."""
    paired = np.flatnonzero(pairs >= 0)
    same = (t_ends[paired] >= 0) & (t_ends[paired] == s_ends[pairs[paired]])
    return int(same.sum()), int(paired.size)


def run_case(text: str, target_tok, source_tok, repeats: int, dtw_repeats: int) -> dict:
    t_ids, t_ends = token_end_chars(text, target_tok)
    s_ids, s_ends = token_end_chars(text, source_tok, role="source")
    ours_s, ours = timed(
        lambda: align_positions(text, target_tok, source_tok, method="offsets"), 3 * repeats
    )

    def baseline():
        path, t_str, s_str = published(text, target_tok, source_tok)
        return path, check_pairs(path, t_str, s_str, "hard"), t_str, s_str

    dtw_s, (path, hard, t_str, s_str) = timed(baseline, dtw_repeats)
    soft = check_pairs(path, t_str, s_str, "soft", mined_map(set(s_str), target_tok))
    row = {
        "target_tokens": len(t_ids),
        "source_tokens": len(s_ids),
        "offsets_s": ours_s,
        "dtw_s": dtw_s,
    }
    for name, pairs in (("offsets", ours), ("dtw", hard), ("dtw_soft", soft), ("dtw_path", path)):
        row[f"{name}_correct"], row[f"{name}_pairs"] = score(pairs, t_ends, s_ends)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    parser.add_argument("--tokenizers", type=Path, default=DEFAULT_TOKENIZERS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(n < 1 for n in args.sizes):
        parser.error("--sizes and --repeats must be positive")
    for name in ("llama-spm", "mpt"):
        if not (args.tokenizers / name / "tokenizer.json").is_file():
            parser.error(f"no tokenizer.json in {args.tokenizers / name} (see --tokenizers)")
    target_tok = AutoTokenizer.from_pretrained(args.tokenizers / "llama-spm")
    source_tok = AutoTokenizer.from_pretrained(args.tokenizers / "mpt")
    corpora = {"prose": prose_corpus(), "code": code_corpus()}

    # Warm caches (marker lookup, tokenizer state) and check that the baseline we time is the
    # one `align_positions(method="dtw")` runs.
    probe = cut_to_tokens(corpora["prose"], target_tok, 64)
    path, t_str, s_str = published(probe, target_tok, source_tok)
    via_align = align_positions(probe, target_tok, source_tok, method="dtw")
    if not np.array_equal(check_pairs(path, t_str, s_str, "hard"), via_align):
        raise RuntimeError("the timed baseline differs from align_positions(method='dtw')")
    align_positions(probe, target_tok, source_tok)

    rows = []
    cases = [(n, domain) for n in sorted(args.sizes) for domain in corpora]
    for n, domain in tqdm(cases, desc="align", file=sys.stderr):
        text = cut_to_tokens(corpora[domain], target_tok, n)
        dtw_repeats = max(1, min(args.repeats, round(args.repeats * 512 / n)))
        rows.append(
            {
                "size": n,
                "domain": domain,
                **run_case(text, target_tok, source_tok, args.repeats, dtw_repeats),
            }
        )

    table = Table(title="Llama-2 target <- MPT source: offsets (ours) vs published DTW")
    for col in (
        "size",
        "text",
        "tokens t/s",
        "offsets ms",
        "DTW ms",
        "speedup",
        "offsets ok/pairs",
        "DTW hard ok/pairs",
        "DTW soft ok/pairs",
        "DTW path ok/pairs",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["size"]),
            r["domain"],
            f"{r['target_tokens']}/{r['source_tokens']}",
            f"{1e3 * r['offsets_s']:.1f}",
            f"{1e3 * r['dtw_s']:.0f}",
            f"{r['dtw_s'] / r['offsets_s']:.0f}x",
            *(
                f"{r[k + '_correct']}/{r[k + '_pairs']}"
                for k in ("offsets", "dtw", "dtw_soft", "dtw_path")
            ),
        )
    Console(width=150).print(table)

    summary: dict = {
        "bench": "align",
        "target": "llama-spm",
        "source": "mpt",
        "sizes": sorted(args.sizes),
        "repeats": args.repeats,
    }
    for n in sorted(args.sizes):
        at = [r for r in rows if r["size"] == n]
        ours_s = sum(r["offsets_s"] for r in at)
        dtw_s = sum(r["dtw_s"] for r in at)
        summary[f"offsets_ms_{n}"] = round(1e3 * ours_s, 2)
        summary[f"dtw_ms_{n}"] = round(1e3 * dtw_s, 1)
        summary[f"speedup_{n}"] = round(dtw_s / ours_s, 1)
        summary[f"target_tokens_{n}"] = sum(r["target_tokens"] for r in at)
        for key in ("offsets", "dtw", "dtw_soft", "dtw_path"):
            summary[f"{key}_correct_{n}"] = sum(r[f"{key}_correct"] for r in at)
            summary[f"{key}_pairs_{n}"] = sum(r[f"{key}_pairs"] for r in at)
    summary["speedup"] = summary[f"speedup_{max(args.sizes)}"]
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
