"""Teacher signal of a vocabulary map: where does the source's true next token land?

At every aligned position (target and source contexts end at the same character, offset
alignment) we take the token the source tokenization actually has next, map it into the target
vocabulary, and count how often the mapped token is (a) the target's own next token and (b) a
valid continuation: its text is a prefix of the text that follows the position. A map that
fails (b) teaches the target to put mass on text that does not come next. "source" is the
ceiling: how often the source's own next token is such a prefix (tokenizers that normalise the
text, or convert it imperfectly, can disagree with it).

Real vocabularies (tests/data/tokenizers: llama-spm, mpt, gpt-2; all 6 ordered pairs) on text
that ships with Python: English prose (pydoc_data topics), standard-library code, a block of
numbers and dates generated here, and non-Latin scripts (sentences below plus `unicodedata`
character tables). Both map methods: "prefix" (ours, the default) and "mined" (published).

    .venv/bin/python benchmarks/bench_teacher_signal.py [--chars 60000]
"""

from __future__ import annotations

import argparse
import random
import time
import unicodedata

from _common import emit, load_tokenizer

from fusellm.method.tokens import canonical_vocabulary
from fusellm.method.vocab import build_vocab_map, teacher_signal_counts

NAMES = ("llama-spm", "mpt", "gpt-2")
METHODS = ("prefix", "mined")

SCRIPTS = {
    "greek": "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας και μία από τις αρχαιότερες πόλεις του "
    "κόσμου. Το 2019 την επισκέφθηκαν περισσότεροι από έξι εκατομμύρια τουρίστες. Τα παιδιά "
    "διαβάζουν βιβλία στη βιβλιοθήκη κάθε Σάββατο, και οι γονείς πίνουν καφέ στην πλατεία.",
    "russian": "Москва — столица России и крупнейший город страны. В 2019 году в городе жили "
    "более двенадцати миллионов человек. Вечером мы читали книги, пили чай с вареньем и долго "
    "говорили о будущем, о науке и о путешествиях.",
    "chinese": "北京是中华人民共和国的首都，也是全国的政治和文化中心。二零一九年，很多游客来到"
    "这里参观故宫和长城。我们每天早上喝茶、看书，学习新的知识；晚上和朋友一起散步。",
    "japanese": "東京は日本の首都で、世界で最も人口の多い都市のひとつです。春には桜が咲き、"
    "多くの人が公園で花見を楽しみます。",
    "arabic": "القاهرة هي عاصمة مصر وأكبر مدنها. في عام 2019 زار المدينة ملايين السياح من "
    "جميع أنحاء العالم. نحن نقرأ الكتب ونشرب الشاي في المساء ونتحدث عن المستقبل.",
    "hindi": "दिल्ली भारत की राजधानी है और यह एक बहुत पुराना शहर है। 2019 में यहाँ लाखों "
    "पर्यटक आए। हम हर सुबह चाय पीते हैं, अख़बार पढ़ते हैं और फिर काम पर जाते हैं।",
}
# Blocks of letters for the `unicodedata` tables: Greek, Cyrillic, Arabic, Devanagari, CJK.
RANGES = [(0x0391, 0x03C9), (0x0410, 0x044F), (0x0621, 0x064A), (0x0905, 0x0939), (0x4E00, 0x4E80)]


def prose(chars: int) -> list[str]:
    from pydoc_data.topics import topics

    return _take([topics[k] for k in sorted(topics)], chars)


def code(chars: int) -> list[str]:
    import sysconfig
    from pathlib import Path

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return _take([p.read_text(encoding="utf-8", errors="replace") for p in files], chars)


def numbers(chars: int, seed: int = 0) -> list[str]:
    """Figures as they appear in text: years, dates, times, counts, money, versions, tables."""
    rng = random.Random(seed)
    months = ["January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"]
    lines, total = [], 0
    while total < chars:
        y, m, d = rng.randint(1900, 2030), rng.randint(1, 12), rng.randint(1, 28)
        n, k = rng.randint(2, 99_999), rng.randint(1, 999)
        line = rng.choice([
            f"In {y}, {n:,} of {n + k:,} items ({100 * n / (n + k):.1f}%) shipped on {y}-{m:02d}-{d:02d}.",
            f"On {months[m - 1]} {d}, {y} at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} the price was ${k}.{rng.randint(0, 99):02d}.",
            f"| {y} | {n} | {k} | {n * k} | {rng.random():.4f} |",
            f"version {rng.randint(0, 9)}.{rng.randint(0, 30)}.{k} released {d}/{m}/{y}; {n} downloads",
            f"    x[{k}] = {n} * {rng.randint(2, 9)} + {y}  # {d:02d}.{m:02d}.{y}",
            f"Between {y} and {y + k % 20} the population grew from {n} to {n + 25 * k}.",
        ])
        lines.append(line)
        total += len(line) + 1
    return ["\n".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]


def scripts() -> list[str]:
    tables = []
    for lo, hi in RANGES:
        rows = [f"{chr(c)} {unicodedata.name(chr(c), '')}" for c in range(lo, hi + 1)]
        word = "".join(chr(c) for c in range(lo, hi + 1))
        tables.append("\n".join(rows) + "\n" + " ".join(word[i : i + 5] for i in range(0, len(word), 5)))
    return list(SCRIPTS.values()) + tables


def _take(texts: list[str], chars: int) -> list[str]:
    out, total = [], 0
    for text in texts:
        if total >= chars:
            break
        text = text[: chars - total]
        if text.strip():
            out.append(text)
            total += len(text)
    return out


def corpus(chars: int) -> dict[str, list[str]]:
    return {"prose": prose(chars), "code": code(chars), "numbers": numbers(chars // 3), "scripts": scripts()}


def measure(texts, source, target, vmap, source_vocab, target_vocab) -> dict:
    total = {"positions": 0, "exact_next": 0, "valid": 0, "source_valid": 0}
    for text in texts:
        counts = teacher_signal_counts(
            text, source, target, vmap.source_to_target, source_vocab=source_vocab, target_vocab=target_vocab
        )
        for key, value in counts.items():
            total[key] += value
    return total


def share(counts: dict, key: str) -> float:
    return counts[key] / max(counts["positions"], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chars", type=int, default=60_000, help="characters of prose and of code")
    args = parser.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()  # whole documents exceed model_max_length; we only tokenize
    tokenizers = {n: load_tokenizer(n) for n in NAMES}
    vocabs = {n: canonical_vocabulary(t) for n, t in tokenizers.items()}
    domains = corpus(args.chars)
    print("text: " + ", ".join(f"{d} {sum(map(len, t)):,} chars" for d, t in domains.items()))
    print()
    header = "| target <- source | method | positions | exact next | valid | not valid | " + " | ".join(
        f"valid {d}" for d in domains) + " | source ceiling | map build |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    result = {"bench": "teacher_signal"}
    for target in NAMES:
        for source in NAMES:
            if source == target:
                continue
            valid = {}
            for method in METHODS:
                start = time.perf_counter()
                vmap = build_vocab_map(tokenizers[source], tokenizers[target], method=method, progress=False)
                seconds = time.perf_counter() - start
                per_domain = {
                    d: measure(t, tokenizers[source], tokenizers[target], vmap, vocabs[source], vocabs[target])
                    for d, t in domains.items()
                }
                total = {k: sum(c[k] for c in per_domain.values()) for k in per_domain["prose"]}
                valid[method] = share(total, "valid")
                cells = " | ".join(f"{share(c, 'valid'):.2%}" for c in per_domain.values())
                print(f"| {target} <- {source} | {method} | {total['positions']:,} | "
                      f"{share(total, 'exact_next'):.2%} | **{share(total, 'valid'):.2%}** | "
                      f"{total['positions'] - total['valid']:,} | {cells} | "
                      f"{share(total, 'source_valid'):.2%} | {seconds:.1f} s |")
                key = f"{source}_to_{target}".replace("-", "")
                result[f"{key}_{method}_valid"] = round(share(total, "valid"), 4)
                result[f"{key}_{method}_exact_next"] = round(share(total, "exact_next"), 4)
                result[f"{key}_{method}_not_valid"] = total["positions"] - total["valid"]
            result[f"{key}_valid_ratio"] = round(valid["prefix"] / max(valid["mined"], 1e-9), 4)
    emit(result)


if __name__ == "__main__":
    main()
