import numpy as np
import pytest
import torch

import fusellm.data.extract as extract_module
from fusellm.data.extract import extract_topk
from fusellm.data.store import StoreError, open_topk
from fusellm.io.fingerprint import model_fingerprint, tokenizer_fingerprint
from fusellm.testing.tiny import tiny_config, tiny_model


@pytest.fixture(scope="module")
def llama(tiny_tokenizers):
    tok = tiny_tokenizers["spm"]
    return tiny_model("llama", tok, seed=3), tok


@pytest.fixture(scope="module")
def pieces(small_corpus):
    return [t[:200] for t in small_corpus[:24]]


def reference(model, tok, text, k):
    """A piece as the model met documents: its BOS, the text, its EOS."""
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    top = logp.topk(k)
    ce = -logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).mean().item()
    return ids, top.indices.numpy(), top.values.numpy(), ce


def test_records_match_a_direct_forward_pass(tmp_path, llama, pieces):
    model, tok = llama
    manifest = extract_topk(model, tok, pieces, tmp_path, top_k=5, batch_size=4, shard_size=10, progress=False)
    store = open_topk(tmp_path)
    assert len(store) == len(pieces) == manifest["count"]
    assert len(manifest["shards"]) == 3 and manifest["complete"]
    assert store.meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert store.meta["model_fingerprint"] == model_fingerprint(model)
    for i in (0, 7, 23):
        ids, top_ids, top_lp, ce = reference(model, tok, pieces[i], 5)
        rec = store[i]
        np.testing.assert_array_equal(rec.input_ids, ids)
        assert rec.input_ids[0] == tok.bos_token_id and rec.input_ids[-1] == tok.eos_token_id
        assert (rec.ids == top_ids).mean() > 0.99  # batching may swap near-ties
        assert np.abs(np.exp(rec.logprobs) - np.exp(top_lp)).max() < 0.01
        assert rec.ce == pytest.approx(ce, abs=1e-4)
        assert np.isnan(rec.token_ce[-1]) and rec.token_ce[:-1].mean() == pytest.approx(ce, abs=1e-3)


def test_interrupted_extraction_resumes_at_first_missing_shard(tmp_path, llama, pieces, monkeypatch):
    model, tok = llama
    real_batch = extract_module._topk_batch
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # dies during the second shard (batches of 4, shards of 10)
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(extract_module, "_topk_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        extract_topk(model, tok, pieces, tmp_path, top_k=5, batch_size=4, shard_size=10, progress=False)
    first = tmp_path / "shard-00000.safetensors"
    assert first.exists() and not (tmp_path / "shard-00001.safetensors").exists()
    with pytest.raises(StoreError, match="incomplete"):
        open_topk(tmp_path)
    stamp = first.stat().st_mtime_ns

    seen = []
    monkeypatch.setattr(
        extract_module, "_topk_batch", lambda m, b, *a: seen.extend(a[-1]) or real_batch(m, b, *a)
    )
    extract_topk(model, tok, pieces, tmp_path, top_k=5, batch_size=4, shard_size=10, progress=False)
    assert first.stat().st_mtime_ns == stamp and min(seen) == 10  # shard 0 was not recomputed
    fresh = tmp_path.parent / "fresh"
    extract_topk(model, tok, pieces, fresh, top_k=5, batch_size=4, shard_size=10, progress=False)
    resumed, full = open_topk(tmp_path), open_topk(fresh)
    for i in range(len(pieces)):
        np.testing.assert_array_equal(resumed[i].ids, full[i].ids)


def test_resume_with_other_texts_is_refused(tmp_path, llama, pieces):
    model, tok = llama
    extract_topk(model, tok, pieces[:5], tmp_path, top_k=3, progress=False)
    with pytest.raises(StoreError, match="meta"):
        extract_topk(model, tok, pieces[1:6], tmp_path, top_k=3, progress=False)


def test_bad_input(tmp_path, llama, pieces):
    model, tok = llama
    with pytest.raises(ValueError, match="top_k=100000 must be between 1 and"):
        extract_topk(model, tok, pieces, tmp_path, top_k=100000, progress=False)
    with pytest.raises(ValueError, match="piece 1 is empty"):
        extract_topk(model, tok, ["ok", ""], tmp_path, progress=False)
    with pytest.raises(ValueError, match="no texts"):
        extract_topk(model, tok, [], tmp_path, progress=False)
    with pytest.raises(ValueError, match="piece 0 has .* more than max_length=8"):
        extract_topk(model, tok, [pieces[0]], tmp_path, max_length=8, progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_nan_logits_name_the_piece(tmp_path, tiny_tokenizers, pieces):
    tok = tiny_tokenizers["spm"]
    model = tiny_model("llama", tok, seed=1)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or infinite logits for piece 0"):
        extract_topk(model, tok, pieces[:1], tmp_path, progress=False)


def test_other_architectures_and_tokenizers(tmp_path, tiny_tokenizers, pieces):
    tok = tiny_tokenizers["bytelevel"]
    for arch in ("gpt_neox", "gpt2"):
        model = tiny_model(arch, tok, seed=2)
        manifest = extract_topk(model, tok, pieces[:6], tmp_path / arch, top_k=4, progress=False)
        assert manifest["count"] == 6 and manifest["tokens"] > 6
        assert open_topk(tmp_path / arch)[5].ids.shape[1] == 4


def sized_model(tok, rows, seed=4):
    """A tiny Llama whose embedding and output have `rows` rows, not len(tok)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", tok)
    config.vocab_size = rows
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def test_output_larger_than_the_tokenizer(tmp_path, tiny_tokenizers, pieces):
    """Padded rows (MPT-7B, Qwen2) are ranked like any other: the store keeps them, up to the
    model's output size, and records the tokenizer's size for fusion to drop them."""
    tok = tiny_tokenizers["spm"]
    model = sized_model(tok, len(tok) + 200)
    manifest = extract_topk(model, tok, pieces[:4], tmp_path, top_k=6, progress=False)
    store = open_topk(tmp_path)
    assert manifest["vocab_size"] == len(tok) + 200 and store.meta["tokenizer_size"] == len(tok)
    for i in range(4):
        _, top_ids, _, ce = reference(model, tok, pieces[i], 6)
        assert (store[i].ids == top_ids).mean() > 0.99
        assert store[i].ce == pytest.approx(ce, abs=1e-4)
    assert any((store[i].ids >= len(tok)).any() for i in range(4))


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, tiny_tokenizers, pieces):
    tok = tiny_tokenizers["spm"]
    with pytest.raises(ValueError, match="embedding rows; the tokenizer .* does not belong"):
        extract_topk(sized_model(tok, len(tok) // 2), tok, pieces, tmp_path, progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_manifest_reports_the_share_of_positions_whose_topk_holds_the_mass(tmp_path, llama, pieces):
    """topk_mass: from the exact values (before companding), summed exactly over shards."""
    from fusellm.data.store import concat_stores

    model, tok = llama
    one = extract_topk(model, tok, pieces, tmp_path / "one", top_k=5, shard_size=100, progress=False)
    mass = []
    for text in pieces:
        _, _, top_lp, _ = reference(model, tok, text, 5)
        mass.append(np.exp(top_lp[:-1]).sum(-1))  # the position after EOS predicts nothing
    mass = np.concatenate(mass)
    got = one["topk_mass"]
    assert got["positions"] == mass.size == one["tokens"] - len(pieces)
    assert got["mean"] == pytest.approx(mass.mean(), abs=1e-5)
    for name, level in (("ge_50", 0.5), ("ge_90", 0.9), ("ge_99", 0.99)):
        near = np.abs(mass - level) < 1e-5  # float32 vs float64 may disagree right at a level
        assert abs(got[name] - (mass >= level).mean()) <= near.mean() + 1e-12
    assert 1 >= got["ge_50"] >= got["ge_90"] >= got["ge_99"] >= 0
    vocab = extract_module._output_vocab(model)  # the whole vocabulary kept: all the mass
    full = extract_topk(model, tok, pieces[:4], tmp_path / "full", top_k=vocab, progress=False)
    assert full["topk_mass"]["ge_99"] == 1.0 and full["topk_mass"]["mean"] == pytest.approx(1.0)
    # per-shard stores joined into one report the same shares as the single extraction
    parts = []
    for n, start in enumerate(range(0, len(pieces), 10)):
        parts.append(tmp_path / f"part{n}")
        extract_topk(
            model, tok, pieces[start : start + 10], parts[-1], top_k=5, shard_size=10, progress=False
        )
    joined = concat_stores(parts, tmp_path / "joined")
    assert joined["topk_mass"]["positions"] == got["positions"]
    for name in ("ge_50", "ge_90", "ge_99"):
        assert joined["topk_mass"][name] == pytest.approx(got[name], abs=1e-12)
    assert joined["topk_mass"]["mean"] == pytest.approx(got["mean"], rel=1e-6)


def test_tokenizer_fingerprint_is_kept_and_follows_changes(tiny_tokenizers):
    import copy

    tok = copy.deepcopy(tiny_tokenizers["bytelevel"])
    first = tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tok) == first and tok._fusellm_fingerprint[1] == first
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert tokenizer_fingerprint(tok) != first
    tok.add_special_tokens({"eos_token": "<|new|>"})  # same size, other special tokens
    assert len({first, tokenizer_fingerprint(tok), tok._fusellm_fingerprint[1]}) == 2
