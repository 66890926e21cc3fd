"""The teacher signal a vocabulary map gives: the source's next token must land on a target token
that continues the text (benchmarks/bench_teacher_signal.py measures all six pairs in full)."""

import random

import numpy as np
import pytest

from fusellm.method.tokens import canonical_vocabulary
from fusellm.method.vocab import build_vocab_map, teacher_signal_counts

SCRIPTS = [
    "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας. Το 2019 την επισκέφθηκαν εκατομμύρια τουρίστες.",
    "Москва — столица России. В 2019 году в городе жили более двенадцати миллионов человек.",
    "北京是中华人民共和国的首都。我们每天早上喝茶、看书，学习新的知识。",
    "القاهرة هي عاصمة مصر وأكبر مدنها. في عام 2019 زار المدينة ملايين السياح.",
    "दिल्ली भारत की राजधानी है। 2019 में यहाँ लाखों पर्यटक आए।",
]


def numbers(lines: int = 60) -> str:
    rng = random.Random(0)
    out = []
    for _ in range(lines):
        y, n, k = rng.randint(1900, 2030), rng.randint(2, 99_999), rng.randint(1, 999)
        out.append(f"In {y}, {n:,} of {n + k:,} items shipped on {y}-{k % 12 + 1:02d}-{k % 28 + 1:02d}; x[{k}] = {n}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def sample(english_texts, code_texts):
    return [t[:2500] for t in english_texts[:6]] + [t[:2500] for t in code_texts[:4]] + [numbers()] + SCRIPTS


@pytest.fixture(scope="module")
def vocabs(real_tokenizers):
    return {n: canonical_vocabulary(real_tokenizers[n]) for n in ("llama-spm", "mpt")}


def shares(texts, source, target, vmap, vocabs, tokenizers):
    total = {"positions": 0, "exact_next": 0, "valid": 0, "source_valid": 0}
    for text in texts:
        counts = teacher_signal_counts(
            text, tokenizers[source], tokenizers[target], vmap.source_to_target,
            source_vocab=vocabs[source], target_vocab=vocabs[target],
        )
        for key in total:
            total[key] += counts[key]
    return total


@pytest.mark.parametrize("source,target", [("mpt", "llama-spm"), ("llama-spm", "mpt")])
def test_default_map_gives_valid_continuations(real_tokenizers, vocabs, sample, source, target):
    vmap = build_vocab_map(real_tokenizers[source], real_tokenizers[target], progress=False)
    total = shares(sample, source, target, vmap, vocabs, real_tokenizers)
    assert total["positions"] > 5000
    assert total["valid"] / total["positions"] >= 0.99
    assert total["exact_next"] <= total["valid"]
    assert total["source_valid"] / total["positions"] >= 0.99


def test_years_map_to_a_space_not_two(real_tokenizers, vocabs, sample):
    """MPT's " 2019": Llama writes a space, then one digit at a time. MinED chose "▁▁"."""
    mpt, llama = real_tokenizers["mpt"], real_tokenizers["llama-spm"]
    prefix = build_vocab_map(mpt, llama, progress=False)
    mined = build_vocab_map(mpt, llama, method="mined", progress=False)
    vocab = mpt.get_vocab()
    numbers = [i for t, i in vocab.items() if t.startswith("Ġ") and t[1:].isdigit()]  # " 2019", " 25"
    assert len(numbers) == 834 and vocab["Ġ2019"] in numbers
    assert set(llama.convert_ids_to_tokens(prefix.source_to_target[numbers].tolist())) == {"▁"}
    assert set(llama.convert_ids_to_tokens(mined.source_to_target[numbers].tolist())) == {"▁▁"}
    # at the position before " 2019" Llama's own next token is "▁": the prefix map hits it
    counts = teacher_signal_counts("It was 2019.", mpt, llama, prefix.source_to_target)
    assert counts == {"positions": 3, "exact_next": 3, "valid": 3, "source_valid": 3}
    # on the sample, MinED falls well short; the prefix map does not
    with_mined = shares(sample, "mpt", "llama-spm", mined, vocabs, real_tokenizers)
    assert with_mined["valid"] / with_mined["positions"] < 0.95


def test_padded_ids_count_as_unmapped(real_tokenizers):
    mpt, llama = real_tokenizers["mpt"], real_tokenizers["llama-spm"]
    short = np.full(3, -1)  # a map that knows nothing (and is shorter than the ids it meets)
    counts = teacher_signal_counts("It was 2019.", mpt, llama, short)
    assert counts["positions"] == 3 and counts["valid"] == counts["exact_next"] == 0
