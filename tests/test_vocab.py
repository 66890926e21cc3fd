import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein

from fusellm.method.tokens import canonical_vocabulary
from fusellm.method.vocab import VocabMap, as_bytes, build_vocab_map, vocab_map_key


@pytest.fixture(scope="module")
def vmap(real_tokenizers):
    """vmap(source, target, method): maps of the real vocabularies, each built once per module."""
    built = {}

    def get(source, target, method="prefix"):
        if (source, target, method) not in built:
            built[source, target, method] = build_vocab_map(
                real_tokenizers[source], real_tokenizers[target], method=method, progress=False
            )
        return built[source, target, method]

    return get


@pytest.fixture(scope="module")
def mpt_to_llama(vmap):
    """The published MinED map (tests of MinED itself)."""
    return vmap("mpt", "llama-spm", "mined")


@pytest.fixture(scope="module")
def mpt_to_llama_prefix(vmap):
    return vmap("mpt", "llama-spm")


def test_exact_matches_are_identical_canonical_strings(real_tokenizers, mpt_to_llama):
    src = canonical_vocabulary(real_tokenizers["mpt"])
    tgt = canonical_vocabulary(real_tokenizers["llama-spm"])
    exact = np.flatnonzero(mpt_to_llama.exact)
    assert len(exact) > 20000
    for sid in exact[::97]:
        if src.canonical[sid] is None:  # special token mapped by role
            continue
        assert src.canonical[sid] == tgt.canonical[mpt_to_llama.source_to_target[sid]]
    gt = real_tokenizers["mpt"].convert_tokens_to_ids("Ġthe")
    assert real_tokenizers["llama-spm"].convert_ids_to_tokens(int(mpt_to_llama.source_to_target[gt])) == "▁the"


@pytest.mark.parametrize("source,target", [("mpt", "llama-spm"), ("gpt-2", "llama-spm"), ("llama-spm", "mpt")])
def test_every_inexact_entry_is_at_the_true_minimum_distance(real_tokenizers, vmap, source, target):
    vmap = vmap(source, target, "mined")
    src = canonical_vocabulary(real_tokenizers[source])
    tgt = canonical_vocabulary(real_tokenizers[target])
    choices = [(i, c) for i, c in enumerate(tgt.canonical) if c]
    inexact = np.flatnonzero((vmap.source_to_target >= 0) & ~vmap.exact)
    rng = np.random.default_rng(0)
    for sid in rng.choice(inexact, size=min(60, len(inexact)), replace=False):
        query = src.canonical[sid]
        true_min = min(Levenshtein.distance(query, c) for _, c in choices)
        got = tgt.canonical[vmap.source_to_target[sid]]
        assert Levenshtein.distance(query, got) == true_min == vmap.distance[sid]
        assert not vmap.exact[sid] and true_min > 0


def test_tie_break_prefers_ordinary_tokens_then_lower_id(real_tokenizers, mpt_to_llama):
    tgt = canonical_vocabulary(real_tokenizers["llama-spm"])
    src = canonical_vocabulary(real_tokenizers["mpt"])
    # "A" exists in Llama both as "A" and as byte fallback <0x41>: the ordinary one wins
    sid = real_tokenizers["mpt"].convert_tokens_to_ids("A")
    assert real_tokenizers["llama-spm"].convert_ids_to_tokens(int(mpt_to_llama.source_to_target[sid])) == "A"
    # among equally distant candidates, the lowest id is chosen
    inexact = np.flatnonzero(~mpt_to_llama.exact & (mpt_to_llama.source_to_target >= 0))
    for sid in inexact[:200]:
        d = mpt_to_llama.distance[sid]
        chosen = mpt_to_llama.source_to_target[sid]
        for tid in range(chosen):
            c = tgt.canonical[tid]
            if c and not tgt.byte_fallback[tid]:
                assert Levenshtein.distance(src.canonical[sid], c) > d


@pytest.mark.parametrize("method", ["prefix", "mined"])
def test_special_tokens_map_by_role_only(real_tokenizers, vmap, method):
    mpt, llama = real_tokenizers["mpt"], real_tokenizers["llama-spm"]
    there = vmap("mpt", "llama-spm", method)
    assert there.source_to_target[mpt.eos_token_id] == llama.eos_token_id
    back = vmap("llama-spm", "mpt", method)
    assert back.source_to_target[llama.eos_token_id] == mpt.eos_token_id
    assert back.source_to_target[llama.bos_token_id] == mpt.bos_token_id
    # no ordinary token is ever mapped onto a special one
    ordinary = [i for i, c in enumerate(canonical_vocabulary(llama).canonical) if c]
    assert not np.isin(back.source_to_target[ordinary], mpt.all_special_ids).any()
    # MPT's padding rows ("[PAD50277]".."[PAD50431]") stand for no text: mapped from nowhere, to nowhere
    pads = [i for i, p in enumerate(mpt.convert_ids_to_tokens(list(range(len(mpt))))) if p == f"[PAD{i}]"]
    assert len(pads) == 155
    assert (there.source_to_target[pads] == -1).all()
    assert not np.isin(back.source_to_target, pads).any()


def test_prefix_map_sends_every_token_to_its_longest_target_prefix(real_tokenizers, mpt_to_llama_prefix):
    vmap = mpt_to_llama_prefix
    src = canonical_vocabulary(real_tokenizers["mpt"])
    tgt = canonical_vocabulary(real_tokenizers["llama-spm"])
    targets = {}
    for tid, text in enumerate(tgt.canonical):
        if text:
            targets.setdefault(as_bytes(text), []).append(tid)
    ordinary = [i for i, c in enumerate(src.canonical) if c]
    assert (vmap.source_to_target[ordinary] >= 0).all()  # Llama has byte fallback: always a prefix
    rng = np.random.default_rng(1)
    for sid in rng.choice(ordinary, size=400, replace=False):
        query = as_bytes(src.canonical[sid])
        got = as_bytes(tgt.canonical[vmap.source_to_target[sid]])
        longest = max(n for n in range(1, len(query) + 1) if query[:n] in targets)
        assert got == query[:longest]
        assert vmap.exact[sid] == (longest == len(query))
        assert vmap.distance[sid] == Levenshtein.distance(src.canonical[sid], tgt.canonical[vmap.source_to_target[sid]])
    # ties: "A" is both an ordinary Llama token and byte fallback <0x41>: the ordinary one wins
    a = real_tokenizers["mpt"].convert_tokens_to_ids("A")
    assert real_tokenizers["llama-spm"].convert_ids_to_tokens(int(vmap.source_to_target[a])) == "A"
    # MinED picked the word, the prefix map a shorter piece that really comes next
    almost = real_tokenizers["mpt"].convert_tokens_to_ids("Almost")
    assert real_tokenizers["llama-spm"].convert_ids_to_tokens(int(vmap.source_to_target[almost])) == "Al"


def test_prefix_map_uses_byte_fallback_inside_a_character(real_tokenizers, tiny_tokenizers):
    """A target without the character still continues the text: with its first byte."""
    llama, tiny = real_tokenizers["llama-spm"], tiny_tokenizers["spm"]
    vmap = build_vocab_map(llama, tiny, progress=False)
    ni = llama.convert_tokens_to_ids("你")
    assert tiny.convert_ids_to_tokens(int(vmap.source_to_target[ni])) == "<0xE4>"  # "你" = E4 BD A0


def test_deterministic_save_load_and_cache(tmp_path, tiny_tokenizers):
    a, b = tiny_tokenizers["bytelevel"], tiny_tokenizers["spm"]
    first = build_vocab_map(a, b, cache_dir=tmp_path, progress=False)
    second = build_vocab_map(a, b, progress=False)
    np.testing.assert_array_equal(first.source_to_target, second.source_to_target)
    cached = list(tmp_path.glob("vocabmap-*.npz"))
    assert len(cached) == 1 and first.key in cached[0].name
    loaded = VocabMap.load(cached[0])
    np.testing.assert_array_equal(loaded.exact, first.exact)
    assert loaded.key == vocab_map_key(a, b) != vocab_map_key(b, a)
    assert loaded.method == first.method == "prefix"
    assert build_vocab_map(a, b, cache_dir=tmp_path, progress=False).key == first.key
    stats = first.stats()
    assert 0 < stats["exact_rate"] <= 1 and stats["mapped"] <= stats["source_vocab"]
    # the method is part of the key: MinED gets its own cache entry, never the prefix map's
    mined = build_vocab_map(a, b, method="mined", cache_dir=tmp_path, progress=False)
    assert mined.key == vocab_map_key(a, b, "mined") != first.key
    assert len(list(tmp_path.glob("vocabmap-*.npz"))) == 2
    assert VocabMap.load(tmp_path / f"vocabmap-{mined.key}.npz").method == "mined"
    with pytest.raises(ValueError, match="method 'best'"):
        build_vocab_map(a, b, method="best", progress=False)


def test_load_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.npz"):
        VocabMap.load(bad)
