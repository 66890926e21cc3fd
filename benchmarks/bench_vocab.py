"""Vocabulary map build time: ours vs the published per-token Python loop (sampled).

The published mapping loops in Python over every unmatched source token and computes the edit
distance to every target token. Running it whole takes ~26 CPU-minutes for MPT -> Llama-2, so the
baseline is timed on a sample of unmatched tokens and extrapolated (printed as such). We time
the same algorithm (method="mined") and our default (method="prefix", see
benchmarks/bench_teacher_signal.py for what each map teaches).
Also maps a synthetic 150k byte-level vocabulary (built from the real GPT-2, MPT and Llama-2
vocabularies plus generated joins) in both directions, with both methods.

    .venv/bin/python benchmarks/bench_vocab.py [--sample 100] [--skip-150k]
"""

from __future__ import annotations

import argparse
import itertools
import time

from _common import emit, load_tokenizer
from rapidfuzz.distance import Levenshtein

from fusellm.method.tokens import canonical_vocabulary
from fusellm.method.vocab import build_vocab_map


def published_seconds_per_token(source, target, sample: int) -> tuple[float, int]:
    """Time the published loop (min edit distance over all target tokens) per unmatched token."""
    src = canonical_vocabulary(source).canonical
    tgt = [c for c in canonical_vocabulary(target).canonical if c]
    exact = set(tgt)
    unmatched = [c for c in src if c and c not in exact]
    start = time.perf_counter()
    for query in unmatched[:sample]:
        best_d = None
        for cand in tgt:
            d = Levenshtein.distance(query, cand)
            if best_d is None or d < best_d:
                best_d = d
    return (time.perf_counter() - start) / min(sample, len(unmatched)), len(unmatched)


def synthetic_150k(base):
    """A byte-level BPE tokenizer with ~150k entries made from real vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fusellm.method.tokens import _byte_decoder

    to_char = {b: c for c, b in _byte_decoder().items()}
    seen, entries = set(), []
    for tok in base:
        for text in canonical_vocabulary(tok).canonical:
            if text and text not in seen:
                seen.add(text)
                entries.append(text)
    words = [e for e in entries if e.startswith(" ") and e[1:].isalpha()][:2000]
    for a, b in itertools.product(words, words):
        if len(entries) >= 150_000:
            break
        joined = a + b.strip()
        if joined not in seen:
            seen.add(joined)
            entries.append(joined)
    vocab = {"<|endoftext|>": 0}
    for text in entries:
        piece = "".join(to_char[b] for b in text.encode("utf-8", "surrogateescape"))
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sample", type=int, default=100)
    parser.add_argument("--skip-150k", action="store_true")
    args = parser.parse_args()
    llama = load_tokenizer("llama-spm")
    result = {"bench": "vocab"}
    for name in ("mpt", "gpt-2"):
        source = load_tokenizer(name)
        seconds = {}
        for method in ("mined", "prefix"):
            start = time.perf_counter()
            vmap = build_vocab_map(source, llama, method=method, progress=False)
            seconds[method] = time.perf_counter() - start
        ours = seconds["mined"]
        per_token, unmatched = published_seconds_per_token(source, llama, args.sample)
        baseline = per_token * unmatched
        stats = vmap.stats()
        print(f"{name} -> llama-spm: MinED ours {ours:.1f} s; published loop {per_token * 1e3:.1f} ms/token "
              f"x {unmatched} unmatched = {baseline / 60:.1f} min (extrapolated from {args.sample}); "
              f"exact {stats['exact_rate']:.1%}, speedup {baseline / ours:.0f}x; prefix map {seconds['prefix']:.1f} s")
        key = name.replace("-", "")
        result[f"{key}_to_llama_seconds"] = round(ours, 2)
        result[f"{key}_to_llama_prefix_seconds"] = round(seconds["prefix"], 2)
        result[f"{key}_to_llama_published_seconds_est"] = round(baseline, 1)
        result[f"{key}_to_llama_speedup"] = round(baseline / ours, 1)
    if not args.skip_150k:
        big = synthetic_150k([load_tokenizer("gpt-2"), load_tokenizer("mpt"), llama])
        for label, (src, tgt) in {"150k_to_llama": (big, llama), "mpt_to_150k": (load_tokenizer("mpt"), big)}.items():
            for method in ("mined", "prefix"):
                start = time.perf_counter()
                build_vocab_map(src, tgt, method=method, progress=False)
                seconds = time.perf_counter() - start
                print(f"{label} ({len(src)} -> {len(tgt)}), {method}: {seconds:.1f} s")
                result[f"{label}{'' if method == 'mined' else '_prefix'}_seconds"] = round(seconds, 1)
    emit(result)


if __name__ == "__main__":
    main()
