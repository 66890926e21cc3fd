"""Common helpers of the benchmarks: real tokenizers and real text that ships with Python."""

from __future__ import annotations

import json
import statistics
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT / "tests" / "data" / "tokenizers"


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZERS / name))


def real_text(min_chars: int = 200_000) -> str:
    """English documentation and standard-library code, interleaved, deterministic."""
    from pydoc_data.topics import topics

    prose = [topics[k] for k in sorted(topics)]
    code = [p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]
    parts, total = [], 0
    for a, b in zip(prose, code):
        parts += [a, b]
        total += len(a) + len(b)
        if total >= min_chars:
            break
    return "\n".join(parts)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_prob_error(records, truth) -> float:
    """Largest error of a probability read back from a top-k store: `records` as read (an
    empty slot, id -1, counts as probability 0), `truth` the float log-probs of the same slots."""
    import numpy as np

    worst = 0.0
    for got, true_lp in zip(records, truth, strict=True):
        err = np.abs(np.where(got.ids >= 0, np.exp(got.logprobs), 0) - np.exp(true_lp))
        worst = max(worst, float(err.max()))
    return worst


def emit(result: dict) -> None:
    """Print the final JSON line every benchmark ends with."""
    print(json.dumps(result, sort_keys=True))
