import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fusellm.data.extract import extract_topk
from fusellm.data.fused_data import SourceData, build_fused_store
from fusellm.data.store import StoreError, open_topk
from fusellm.method.fuse import (
    avg_ce,
    avg_ce_unnormalised,
    merge_topk,
    min_ce,
    one_hot_topk,
    renormalise,
    transfer,
)
from fusellm.method.vocab import build_vocab_map
from fusellm.testing.tiny import tiny_config, tiny_model

NEG = -np.inf


def log(p):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, dtype=np.float64))


def test_merge_topk_sums_duplicates_and_sorts():
    ids = np.array([[3, 5, 3, -1], [7, 7, 7, 2]])
    lp = np.log(np.array([[0.2, 0.3, 0.1, 0.5], [0.1, 0.1, 0.1, 0.05]]))
    out_ids, out_lp = merge_topk(ids, lp, k=3)
    np.testing.assert_array_equal(out_ids, [[3, 5, -1], [7, 2, -1]])
    np.testing.assert_allclose(np.exp(out_lp[0, :2]), [0.3, 0.3])
    np.testing.assert_allclose(np.exp(out_lp[1, :2]), [0.3, 0.05])
    assert np.isneginf(out_lp[:, 2]).all()


def test_merge_topk_keeps_k_largest_tie_lower_id():
    ids = np.array([[9, 4, 6, 1]])
    lp = np.log(np.array([[0.25, 0.25, 0.4, 0.1]]))
    out_ids, _ = merge_topk(ids, lp, k=2)
    np.testing.assert_array_equal(out_ids, [[6, 4]])


def test_transfer_maps_merges_and_fills_one_hot():
    source_ids = np.array([[0, 1, 2], [2, 3, 0]])
    source_lp = np.log(np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]]))
    to_target = np.array([10, 10, -1, 11])  # ids 0 and 1 land on 10; id 2 unmapped
    alignment = np.array([1, -1, 0])
    target_next = np.array([20, 21, -1])
    ids, lp, dropped = transfer(source_ids, source_lp, alignment, to_target, target_next, k=3)
    assert dropped == 0
    np.testing.assert_array_equal(ids[0, :2], [11, 10])  # row 1 of the source: 3 -> 11, 0 -> 10
    np.testing.assert_allclose(np.exp(lp[0, :2]), [0.2, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(ids[1], [21, -1, -1])  # unaligned: the target's next token
    assert lp[1, 0] == 0.0
    np.testing.assert_array_equal(ids[2, :1], [10])
    np.testing.assert_allclose(np.exp(lp[2, 0]), 0.8, rtol=1e-6)


def test_transfer_credits_the_sources_own_next_token_to_the_targets():
    """next_token="target": the source's mass on the token it really reads next (its own
    segmentation of the text) goes to the target's next token, not through the map."""
    source_ids = np.array([[0, 1, 2], [2, 3, 0]])
    source_lp = np.log(np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]]))
    to_target = np.array([10, 10, 12, 11])
    alignment = np.array([1, -1, 0])
    target_next = np.array([20, 21, -1])
    source_next = np.array([1, 3])  # source position 0 reads id 1 next, position 1 reads id 3
    ids, lp, _ = transfer(source_ids, source_lp, alignment, to_target, target_next, 3, source_next)
    # target position 0 <- source row 1: id 3 (its next token, 0.2) goes to the target's 20
    np.testing.assert_array_equal(ids[0], [12, 20, 10])
    np.testing.assert_allclose(np.exp(lp[0]), [0.6, 0.2, 0.1], rtol=1e-6)
    # target position 2 has no next token: the map stays (id 1 -> 10 merges with id 0 -> 10)
    np.testing.assert_array_equal(ids[2, :2], [10, 12])
    np.testing.assert_allclose(np.exp(lp[2, :2]), [0.8, 0.1], rtol=1e-6)
    plain, _, _ = transfer(source_ids, source_lp, alignment, to_target, target_next, 3)
    np.testing.assert_array_equal(plain[0], [12, 11, 10])


def test_transfer_never_looks_up_empty_slots_or_padding_rows():
    """A model's output can be larger than its tokenizer: ids past the map are dropped, counted."""
    to_target = np.array([10, 11, 12])  # the tokenizer has 3 entries; the model 6 output rows
    source_ids = np.array([[5, 0, -1], [4, 3, -1], [1, 2, 0]])
    source_lp = log([[0.5, 0.3, 0.0], [0.6, 0.3, 0.0], [0.5, 0.25, 0.25]])
    source_lp[2, 2] = -np.inf  # a slot the store emptied (id kept, probability gone)
    ids, lp, dropped = transfer(source_ids, source_lp, np.array([0, 1, 2]), to_target, np.array([7, 8, 9]), k=3)
    assert dropped == 3  # 5, 4, 3 (the -1 slots are empty, not padding)
    np.testing.assert_array_equal(ids[0], [10, -1, -1])
    np.testing.assert_allclose(np.exp(lp[0, 0]), 0.3, rtol=1e-6)
    np.testing.assert_array_equal(ids[1], [8, -1, -1])  # nothing usable: the target's next token
    assert lp[1, 0] == 0.0
    np.testing.assert_array_equal(ids[2], [11, 12, -1])  # id 0 with -inf is not looked up


def candidates():
    a = (np.array([[1, 2], [3, 4]]), np.log(np.array([[0.6, 0.4], [0.7, 0.3]])))
    b = (np.array([[2, 5], [3, 6]]), np.log(np.array([[0.9, 0.1], [0.5, 0.5]])))
    return [a, b]


def test_min_ce_per_sequence_and_per_token():
    ids, _, winner = min_ce(candidates(), np.array([2.0, 1.0]))
    np.testing.assert_array_equal(ids, candidates()[1][0])
    assert (winner == 1).all()
    ids, _, winner = min_ce(candidates(), np.array([[1.0, 3.0], [2.0, np.nan]]))
    np.testing.assert_array_equal(winner, [0, 0])  # NaN = absent
    ids, _, winner = min_ce(candidates(), np.array([[1.0, 1.0], [1.0, 0.5]]))
    np.testing.assert_array_equal(winner, [0, 1])  # ties go to the first (the target)
    np.testing.assert_array_equal(ids, [[1, 2], [3, 6]])


def test_avg_ce_as_published_renormalises_and_softmaxes_the_rewards():
    a = (np.array([[1, 2, -1]]), log([[0.3, 0.2, 0.0]]))  # a top-k holding 0.5
    b = (np.array([[2, -1, -1]]), np.array([[0.0, -np.inf, -np.inf]]))  # a one-hot fallback row
    ce = np.array([1.0, 3.0])
    ids, lp, weights = avg_ce([a, b], ce, k=3)
    reward = np.exp(-ce)  # the published code: reward = 1 / exp(CE), weights = softmax(reward)
    w = np.exp(reward) / np.exp(reward).sum()
    np.testing.assert_allclose(weights[:, 0], w)
    assert w[0] == pytest.approx(0.5789, abs=1e-4)  # flat: softmax(-CE) would give 0.881
    probs = dict(zip(ids[0], np.exp(lp[0])))
    assert probs[1] == pytest.approx(w[0] * 0.6, rel=1e-6)  # 0.3 / 0.5: renormalised
    assert probs[2] == pytest.approx(w[0] * 0.4 + w[1], rel=1e-6)
    assert sum(probs.values()) == pytest.approx(1.0, rel=1e-6)
    per_token = avg_ce(candidates(), np.array([[1.0, 1.0], [np.nan, 1.0]]), k=2)
    np.testing.assert_allclose(per_token[2][:, 0], [1.0, 0.0])  # absent: weight 0
    np.testing.assert_allclose(per_token[2][:, 1], [0.5, 0.5])


def test_renormalise_keeps_empty_rows_empty():
    ids = np.array([[3, 4, -1], [-1, -1, -1], [5, 6, 7]])
    lp = log([[0.2, 0.2, 0.0], [0.0, 0.0, 0.0], [0.5, 0.1, 0.0]])
    out = renormalise(ids, lp)
    np.testing.assert_allclose(np.exp(out).sum(-1), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(np.exp(out[2, :2]), [5 / 6, 1 / 6])
    assert np.isneginf(out[1]).all() and np.isneginf(out[2, 2])


def test_avg_ce_unnormalised_variant_weights_by_exp_minus_ce():
    ce = np.array([1.0, 1.0 + np.log(3.0)])  # weights 3/4 and 1/4
    ids, lp, weights = avg_ce_unnormalised(candidates(), ce, k=3)
    np.testing.assert_allclose(weights[:, 0], [0.75, 0.25])
    probs = dict(zip(ids[0], np.exp(lp[0])))
    assert probs[2] == pytest.approx(0.75 * 0.4 + 0.25 * 0.9, rel=1e-6)
    assert probs[1] == pytest.approx(0.75 * 0.6, rel=1e-6)
    assert probs[5] == pytest.approx(0.25 * 0.1, rel=1e-5)
    per_token = avg_ce_unnormalised(candidates(), np.array([[1.0, 1.0], [np.nan, 1.0]]), k=2)
    np.testing.assert_allclose(per_token[2][:, 0], [1.0, 0.0])


def test_one_hot():
    ids, lp = one_hot_topk(np.array([4, -1]), 2)
    np.testing.assert_array_equal(ids, [[4, -1], [-1, -1]])
    assert lp[0, 0] == 0 and np.isneginf(lp[1]).all()


@pytest.fixture(scope="module")
def fusion_inputs(tmp_path_factory, tiny_tokenizers, small_corpus):
    root = tmp_path_factory.mktemp("fusion")
    pieces = [t[:160] for t in small_corpus[:12]]
    t_tok, s_tok = tiny_tokenizers["spm"], tiny_tokenizers["bytelevel"]
    extract_topk(tiny_model("llama", t_tok, seed=0), t_tok, pieces, root / "target", top_k=4, progress=False)
    extract_topk(tiny_model("gpt_neox", s_tok, seed=1), s_tok, pieces, root / "source", top_k=4, progress=False)
    source = SourceData("neox", s_tok, open_topk(root / "source"), build_vocab_map(s_tok, t_tok, progress=False))
    return root, pieces, t_tok, source


@pytest.mark.parametrize("method", ["min_ce", "avg_ce", "avg_ce_unnormalised"])
@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_build_fused_store(fusion_inputs, method, granularity):
    root, pieces, t_tok, source = fusion_inputs
    out = root / f"fused-{method}-{granularity}"
    manifest = build_fused_store(
        pieces, t_tok, open_topk(root / "target"), [source], out,
        method=method, granularity=granularity, shard_size=5, progress=False,
    )
    stats = manifest["sources_stats"]["neox"]
    assert 0.3 < stats["aligned_coverage"] <= 1.0
    assert 0.0 <= stats["exact_map_rate_top1"] <= 1.0
    assert 0.0 <= stats["min_ce_win_rate"] <= 1.0
    fused = open_topk(out)
    target = open_topk(root / "target")
    assert len(fused) == len(pieces) and fused.meta["sources"] == ["neox"]
    for i in range(len(pieces)):
        np.testing.assert_array_equal(fused[i].input_ids, target[i].input_ids)
        rows = fused[i].logprobs[:-1]
        assert (np.exp(rows).sum(-1) <= 1.02).all() and np.isfinite(rows[:, 0]).all()


def test_next_token_target_puts_more_mass_on_the_targets_own_tokens(fusion_inputs):
    """avg_ce mixes the source in everywhere; crediting its mass on its own next token to the
    target's own token can only add to that token (the random tiny source seldom ranks its
    true next token in its top-4, so the semantics are pinned by the transfer test above)."""
    root, pieces, t_tok, source = fusion_inputs
    target = open_topk(root / "target")
    mass = {}
    for mode in ("map", "target"):
        out = root / f"fused-next-{mode}"
        build_fused_store(pieces, t_tok, target, [source], out, method="avg_ce", next_token=mode,
                          progress=False)
        fused = open_topk(out)
        assert fused.meta["next_token"] == mode
        total = 0.0
        for i in range(len(pieces)):
            rec, nxt = fused[i], target[i].input_ids[1:]
            hit = rec.ids[:-1] == nxt[:, None]
            total += float(np.where(hit, np.exp(rec.logprobs[:-1]), 0).sum())
        mass[mode] = total
    assert mass["target"] >= mass["map"] > 0
    with pytest.raises(ValueError, match="next_token='nope'"):
        build_fused_store(pieces, t_tok, target, [source], root / "x", next_token="nope")


def test_sequence_min_ce_picks_the_lower_byte_ce(fusion_inputs):
    root, pieces, t_tok, source = fusion_inputs
    target = open_topk(root / "target")
    out = root / "fused-check"
    build_fused_store(pieces, t_tok, target, [source], out, progress=False)
    fused = open_topk(out)
    for i, text in enumerate(pieces):
        n_bytes = len(text.encode())
        t_ce = target[i].ce * (len(target[i]) - 1) / n_bytes
        s_ce = source.store[i].ce * (len(source.store[i]) - 1) / n_bytes
        same_as_target = np.array_equal(fused[i].ids, target[i].ids)
        assert same_as_target == (t_ce <= s_ce)


def test_mismatched_inputs_fail_before_work(fusion_inputs, tiny_tokenizers):
    root, pieces, t_tok, source = fusion_inputs
    target = open_topk(root / "target")
    wrong = SourceData("neox", tiny_tokenizers["wordpiece"], source.store, source.vocab_map)
    with pytest.raises(StoreError, match="source 'neox' store was made with another tokenizer"):
        build_fused_store(pieces, t_tok, target, [wrong], root / "x", progress=False)
    with pytest.raises(StoreError, match="records for 11 pieces"):
        build_fused_store(pieces[:-1], t_tok, target, [source], root / "x", progress=False)
    with pytest.raises(StoreError, match="other pieces"):
        build_fused_store(pieces[::-1], t_tok, target, [source], root / "x", progress=False)
    with pytest.raises(ValueError, match="method='best'"):
        build_fused_store(pieces, t_tok, target, [source], root / "x", method="best", progress=False)
    assert not (root / "x").exists()


def test_published_dtw_alignment_option(fusion_inputs):
    root, pieces, t_tok, source = fusion_inputs
    manifest = build_fused_store(
        pieces, t_tok, open_topk(root / "target"), [source], root / "fused-dtw", alignment="dtw", progress=False
    )
    stats = manifest["sources_stats"]["neox"]
    offsets = build_fused_store(
        pieces, t_tok, open_topk(root / "target"), [source], root / "fused-offsets", progress=False
    )["sources_stats"]["neox"]
    assert manifest["meta"]["alignment"] == "dtw"
    assert 0 < stats["aligned_coverage"] <= offsets["aligned_coverage"]


def test_target_listed_as_a_source_counts_once(fusion_inputs):
    root, pieces, t_tok, source = fusion_inputs
    target = open_topk(root / "target")
    itself = SourceData("llama", t_tok, target, build_vocab_map(t_tok, t_tok, progress=False))
    for method in ("avg_ce", "min_ce"):
        alone = build_fused_store(pieces, t_tok, target, [source], root / f"alone-{method}",
                                  method=method, granularity="token", progress=False)
        twice = build_fused_store(pieces, t_tok, target, [itself, source], root / f"twice-{method}",
                                  method=method, granularity="token", progress=False)
        assert twice["meta"]["same_as_target"] == ["llama"]
        assert twice["sources_stats"]["llama"]["same_as_target"] == 1
        assert twice["sources_stats"]["neox"]["min_ce_win_rate"] == alone["sources_stats"]["neox"]["min_ce_win_rate"]
        for i in range(len(pieces)):
            np.testing.assert_array_equal(open_topk(root / f"twice-{method}")[i].ids,
                                          open_topk(root / f"alone-{method}")[i].ids)


def padded_model(architecture, tokenizer, extra, seed):
    """A tiny model whose output (and embedding) has `extra` rows more than its tokenizer."""
    config = tiny_config(architecture, tokenizer)
    config.vocab_size = len(tokenizer) + extra
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("method", ["min_ce", "avg_ce"])
def test_models_larger_than_their_tokenizers_end_to_end(tmp_path, tiny_tokenizers, small_corpus, method):
    """Real shapes (MPT-7B: 50,432 rows, ~50,277 tokens): extraction keeps the padded ids the
    model ranks, fusion drops the sources' ones before any lookup and reports how many."""
    pieces = [t[:120] for t in small_corpus[:6]]
    t_tok, s_tok = tiny_tokenizers["spm"], tiny_tokenizers["bytelevel"]
    t_model = padded_model("llama", t_tok, 300, seed=0)
    s_model = padded_model("gpt_neox", s_tok, 400, seed=1)
    extract_topk(t_model, t_tok, pieces, tmp_path / "target", top_k=8, progress=False)
    extract_topk(s_model, s_tok, pieces, tmp_path / "source", top_k=8, progress=False)
    target, store = open_topk(tmp_path / "target"), open_topk(tmp_path / "source")
    assert store.manifest["vocab_size"] == len(s_tok) + 400 and store.meta["tokenizer_size"] == len(s_tok)
    padded = sum(int((store[i].ids >= len(s_tok)).sum()) for i in range(len(pieces)))
    assert padded > 0  # random weights: the padding rows show up in the top-k
    source = SourceData("neox", s_tok, store, build_vocab_map(s_tok, t_tok, progress=False))
    manifest = build_fused_store(pieces, t_tok, target, [source], tmp_path / "fused", method=method,
                                 granularity="token", progress=False)
    stats = manifest["sources_stats"]["neox"]
    assert 0 < stats["dropped_ids"] <= padded
    fused = open_topk(tmp_path / "fused")
    assert fused.manifest["vocab_size"] == len(t_tok) + 300
    for i in range(len(pieces)):
        rows = fused[i].ids[:-1]
        assert (rows[:, 0] >= 0).all() and rows.max() < len(t_tok) + 300
