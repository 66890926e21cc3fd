"""The demo's data splits, its three locally built sources, and held-out bits per byte."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fusellm.demo import data
from fusellm.demo.heldout import bits_per_byte, load_local_model, scored_windows, text_nll
from fusellm.demo.sources import (
    DEFAULT_RECIPE,
    DemoSourcesRecipe,
    build_sources,
)
from fusellm.testing.tiny import tiny_model, train_tokenizer

# --- data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_splits_partition_each_domain_by_content(domain):
    docs = data.documents(domain)
    splits = {s: data.load_split(domain, s) for s in data.SPLITS}
    assert all(splits.values()), {s: len(v) for s, v in splits.items()}
    assert sorted(d for docs_ in splits.values() for d in docs_) == sorted(docs)
    assert len(set(docs)) == len(docs)  # duplicates were dropped
    for split, texts in splits.items():
        assert all(data.split_of(t) == split for t in texts)
    # Shares follow the configuration (held-out ~10 %, fusion ~20 %) within sampling noise.
    assert 0.03 < len(splits["heldout"]) / len(docs) < 0.2
    assert 0.1 < len(splits["fusion"]) / len(docs) < 0.3


def test_heldout_never_overlaps_any_training_text():
    heldout = {t for d in data.DOMAINS for t in data.load_split(d, "heldout")}
    trained = {t for d in data.DOMAINS for s in ("train", "fusion") for t in data.load_split(d, s)}
    assert heldout and trained
    assert not heldout & trained


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_heldout_is_cut_into_validation_and_test_by_content(domain):
    """Recipes are chosen on validation and reported on test: the halves never share a text."""
    heldout = data.load_split(domain, "heldout")
    validation, test = (data.load_split(domain, p) for p in data.HELDOUT_PARTS)
    assert validation and test and not set(validation) & set(test)
    assert sorted(validation + test) == sorted(heldout)
    assert all(data.heldout_part_of(t) == "validation" for t in validation)
    assert all(data.heldout_part_of(t) == "test" for t in test)
    assert data.heldout_part_of(data.load_split(domain, "fusion")[0]) is None
    # each half in hash order, capped as a prefix, like every split
    capped = data.load_split(domain, "test", max_bytes=8000)
    assert capped and capped == test[: len(capped)]
    with pytest.raises(ValueError, match="unknown split"):
        data.load_split(domain, "dev")


def test_domains_are_different_kinds_of_text():
    docs, code, docstrings = (data.load_split(d, "train", max_bytes=200_000) for d in data.DOMAINS)
    def share(texts, needle):
        return sum(t.count(needle) for t in texts) / sum(len(t) for t in texts)
    assert share(code, "self.") > 5 * share(docstrings, "self.")
    assert share(docs, "*****") > 10 * share(code, "*****")  # the reference's heading rules
    assert not any('"""' in t for t in docstrings)
    # Docstrings were cut out of the code: the code domain no longer holds a long one.
    sample = max(docstrings, key=len)[:200]
    assert not any(sample in t for t in code)


def test_splits_are_deterministic_and_caps_take_prefixes():
    full = data.load_split("docstrings", "train")
    capped = data.load_split("docstrings", "train", max_bytes=50_000)
    assert capped == full[: len(capped)]
    assert 0 < sum(len(t.encode()) for t in capped) <= 50_000
    # A fresh computation (cache cleared) gives the same documents in the same order.
    data._positioned.cache_clear()
    data._stdlib_texts.cache_clear()
    assert data.load_split("docstrings", "train", max_bytes=50_000) == capped


def test_split_docstrings_separates_code_from_prose():
    source = (
        '"""Module doc."""\n'
        "import os\n\n"
        "class A:\n"
        '    """Class doc\n\n    over lines."""\n\n'
        "    def f(self):  # keep me\n"
        "        '''Método doc.'''\n"
        "        return 'not a docstring'\n\n"
        'def g(): "inline"; return 1\n'
    )
    code, docstrings = data.split_docstrings(source)
    assert docstrings == ["Module doc.", "Class doc\n\nover lines.", "Método doc.", "inline"]
    assert "doc" not in code.lower().replace("not a docstring", "")
    assert "    def f(self):  # keep me\n        return 'not a docstring'\n" in code
    assert "def g(): ; return 1" in code
    assert code.startswith("import os\n")


def test_chunk_text_respects_the_limit_and_keeps_the_text():
    text = "para one\nline two\n\n" + "x" * 250 + "\n\n" + "short\n" * 30
    pieces = data.chunk_text(text, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")


def test_bad_inputs_are_named():
    with pytest.raises(ValidationError, match="must be below 1"):
        data.DemoSplits(heldout=0.5, fusion=0.5)
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        data.load_split("poetry", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.load_split("docs", "dev")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        data.stdlib_modules(Path("/does-not-exist"))
    with pytest.raises(ValidationError, match="unknown domains"):
        DEFAULT_RECIPE.sources[0].model_validate(
            DEFAULT_RECIPE.sources[0].model_dump() | {"mix": {"poetry": 1.0}}
        )
    with pytest.raises(ValidationError, match="distinct names"):
        DemoSourcesRecipe(sources=(DEFAULT_RECIPE.sources[0],) * 2)


# --- sources ------------------------------------------------------------------------------


def _small_recipe(seed: int = 0) -> DemoSourcesRecipe:
    """The default recipe shrunk to seconds: same architectures, tokenizer kinds and mixes."""
    shrink = {
        "hidden": 16, "layers": 1, "heads": 2, "context": 32, "steps": 4, "batch_size": 2,
        "vocab_size": 400, "tokenizer_bytes": 20_000, "warmup_steps": 1,
    }  # fmt: skip
    return DemoSourcesRecipe(
        sources=tuple(s.model_copy(update=shrink) for s in DEFAULT_RECIPE.sources),
        train_bytes=30_000,
        seed=seed,
    )


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.name != "summary.json"  # holds the build time
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, build_sources(_small_recipe(), cache_dir=cache, progress=False)


def test_sources_build_into_model_folders(built):
    cache, result = built
    assert list(result.paths) == ["llama-docs", "neox-code", "gpt2-docstrings"]
    kinds = {}
    for entry in result.summary["sources"]:
        assert entry["cache_hit"] is False
        assert entry["steps"] == 4 and entry["params"] > 0 and math.isfinite(entry["train_loss"])
        path = result.paths[entry["name"]]
        assert path.parent == cache / "demo-sources"
        assert (path / "model.safetensors").is_file() and (path / "summary.json").is_file()
        assert not list(path.glob("*.bin"))
        model, tokenizer = load_local_model(path)
        kinds[entry["name"]] = (type(model).__name__, len(tokenizer))
        assert model.config.vocab_size >= len(tokenizer)
        # Tokenization is lossless, so bits per byte counts the same text for every model (up to
        # one leading space, which Llama-style tokenizers merge with the word marker they add).
        for domain in data.DOMAINS:
            for text in data.load_split(domain, "heldout", max_bytes=6000):
                decoded = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
                assert decoded == text or (entry["tokenizer"] == "spm" and " " + decoded == text)
    assert kinds["llama-docs"][0] == "LlamaForCausalLM"
    assert kinds["neox-code"][0] == "GPTNeoXForCausalLM"
    assert kinds["gpt2-docstrings"][0] == "GPT2LMHeadModel"
    spm_vocab = load_local_model(result.paths["llama-docs"])[1].get_vocab()
    assert any(t.startswith("▁") for t in spm_vocab) and "<0x0A>" in spm_vocab
    # Three different tokenizers, not one tokenizer three times.
    vocabs = [load_local_model(p)[1].get_vocab() for p in result.paths.values()]
    assert vocabs[0] != vocabs[1] != vocabs[2] != vocabs[0]
    assert not [p for p in (cache / "demo-sources").iterdir() if p.name.startswith(".")]


def test_second_build_is_a_cache_hit(built):
    cache, first = built
    again = build_sources(_small_recipe(), cache_dir=cache, progress=False)
    assert again.paths == first.paths
    assert all(entry["cache_hit"] for entry in again.summary["sources"])
    # Another seed is another recipe: another folder.
    other = build_sources(
        DemoSourcesRecipe(sources=_small_recipe().sources[:1], train_bytes=30_000, seed=1),
        cache_dir=cache,
        progress=False,
    )
    assert other.paths["llama-docs"] != first.paths["llama-docs"]
    assert other.summary["sources"][0]["cache_hit"] is False


def test_rebuild_is_bitwise_identical(built, tmp_path):
    _, first = built
    second = build_sources(_small_recipe(), cache_dir=tmp_path, progress=False)
    for name, path in first.paths.items():
        assert second.paths[name].name == path.name  # same content key
        assert _file_digests(second.paths[name]) == _file_digests(path), name
        a, b = load_local_model(path)[0], load_local_model(second.paths[name])[0]
        for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), f"{name}: {key} differs"


def test_build_reports_missing_text_before_training(tmp_path):
    recipe = _small_recipe().model_copy(update={"sources": (
        _small_recipe().sources[0].model_copy(update={"context": 10_000_000}),
    )})
    with pytest.raises(ValueError, match="shorter than one context"):
        build_sources(recipe, cache_dir=tmp_path, progress=False)
    assert not list((tmp_path / "demo-sources").iterdir())  # nothing half-written


# --- bits per byte ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    texts = data.load_split("docs", "train", max_bytes=20_000)
    tokenizer = train_tokenizer(texts, kind="spm", vocab_size=400)
    return tiny_model("llama", tokenizer, seed=0, hidden=16, layers=1, heads=2), tokenizer


def _hand_bits_per_byte(model, tokenizer, texts, window):
    nats = 0.0
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
        ids.append(tokenizer.eos_token_id)
        for start in range(0, len(ids) - 1, window):  # each window predicts its own tokens
            targets = ids[start + 1 : start + 1 + window]
            inputs = torch.tensor([ids[start : start + len(targets)]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=inputs).logits[0].double(), -1)
            nats -= sum(logp[i, t].item() for i, t in enumerate(targets))
    return nats / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)


def test_bits_per_byte_equals_a_hand_computation(tiny_lm):
    model, tokenizer = tiny_lm
    texts = ["The if statement.", "x = 1\n    return y  # é", "a"]
    expected = _hand_bits_per_byte(model, tokenizer, texts, window=10_000)
    got = bits_per_byte(model, tokenizer, texts, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)
    # Long texts go in windows; padding and batch composition change nothing.
    expected_windowed = _hand_bits_per_byte(model, tokenizer, texts, window=4)
    for batch_size in (1, 3, 8):
        got = bits_per_byte(model, tokenizer, texts, batch_size=batch_size, max_length=4)
        assert got == pytest.approx(expected_windowed, rel=1e-5)
    assert abs(expected_windowed - expected) > 1e-6  # the windows really cut the context


def test_bits_per_byte_counts_every_token_and_byte(tiny_lm):
    model, tokenizer = tiny_lm
    nats, n_bytes = text_nll(model, tokenizer, ["héllo", ""])
    assert n_bytes == 6
    assert nats > 0
    # The empty text still pays for its EOS: one prediction.
    assert text_nll(model, tokenizer, [""])[0] > 0
    assert scored_windows([1, 2, 3, 4, 5], 2) == [([1, 2], [2, 3]), ([3, 4], [4, 5])]
    with pytest.raises(ValueError, match="at least one byte"):
        bits_per_byte(model, tokenizer, [""])
    with pytest.raises(TypeError, match="list of strings"):
        bits_per_byte(model, tokenizer, "one string")
