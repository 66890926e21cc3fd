"""Each model sees a piece framed as it met documents in pretraining (fusellm/data/framing.py)."""

import copy

import numpy as np
import pytest

from fusellm.data.extract import extract_topk
from fusellm.data.framing import FramingError, document_frame, is_chat_marker
from fusellm.data.fused_data import SourceData, build_fused_store
from fusellm.data.store import open_topk
from fusellm.method.vocab import build_vocab_map
from fusellm.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizers):
    """An instruct checkpoint's tokenizer: ChatML markers as BOS and EOS (SmolLM2, Qwen)."""
    tok = copy.deepcopy(tiny_tokenizers["bytelevel"])
    tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    return tok


def test_a_bos_starts_and_the_eos_ends_a_document(tiny_tokenizers):
    tok = tiny_tokenizers["spm"]
    frame = document_frame(tok)
    assert (frame.start_token, frame.end_token) == ("<s>", "</s>")
    assert frame.wrap([7, 8]) == [tok.bos_token_id, 7, 8, tok.eos_token_id]
    assert frame.prefix == 1


def test_chat_markers_give_way_to_the_document_separator(chat_tokenizer):
    frame = document_frame(chat_tokenizer)
    sep = chat_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (frame.start, frame.end) == (sep, sep)
    assert frame.describe()["document_end"] == "<|endoftext|>"
    for marker in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<start_of_turn>"):
        assert is_chat_marker(marker)
    for separator in ("<|endoftext|>", "<eos>", "</s>", "<bos>", "<s>", None):
        assert not is_chat_marker(separator)


def test_overrides_and_their_errors(tiny_tokenizers, chat_tokenizer):
    tok = tiny_tokenizers["spm"]
    frame = document_frame(tok, start="none", end="</s>")
    assert frame.start is None and frame.prefix == 0 and frame.wrap([5]) == [5, tok.eos_token_id]
    with pytest.raises(FramingError, match="document_start: token '<nope>' is not in"):
        document_frame(tok, start="<nope>")
    with pytest.raises(FramingError, match="'none' is not allowed"):
        document_frame(tok, end="none")
    bare = copy.deepcopy(tiny_tokenizers["wordpiece"])  # no separator in its vocabulary
    bare.add_special_tokens({"eos_token": "<|im_end|>"})
    with pytest.raises(FramingError, match="closes a chat turn.*set document_end"):
        document_frame(bare)
    assert document_frame(bare, end="[SEP]").end == bare.convert_tokens_to_ids("[SEP]")


def test_start_positions_align_with_each_other_and_nothing_else(tmp_path, tiny_tokenizers, small_corpus):
    """With both models framed, the start positions pair (they predict the first token after the
    same empty context); with one unframed, its first text position never takes the start's."""
    t_tok, s_tok = tiny_tokenizers["spm"], tiny_tokenizers["bytelevel"]
    pieces = [t[:120] for t in small_corpus[:6]]
    extract_topk(tiny_model("llama", t_tok, seed=0), t_tok, pieces, tmp_path / "t", top_k=4, progress=False)
    s_model = tiny_model("gpt_neox", s_tok, seed=1)
    extract_topk(s_model, s_tok, pieces, tmp_path / "s", top_k=4, progress=False)
    bare = document_frame(s_tok, start="none")
    extract_topk(s_model, s_tok, pieces, tmp_path / "s0", top_k=4, progress=False, frame=bare)
    target = open_topk(tmp_path / "t")
    assert target.meta["prefix_tokens"] == 1 and target.meta["document_start"] == "<s>"
    assert open_topk(tmp_path / "s0").meta["prefix_tokens"] == 0
    vmap = build_vocab_map(s_tok, t_tok)
    coverage = {}
    for name in ("s", "s0"):
        source = SourceData(name, s_tok, open_topk(tmp_path / name), vmap)
        manifest = build_fused_store(pieces, t_tok, target, [source], tmp_path / f"f-{name}", progress=False)
        coverage[name] = manifest["sources_stats"][name]["aligned_coverage"]
        fused = open_topk(tmp_path / f"f-{name}")
        np.testing.assert_array_equal(fused[0].input_ids, target[0].input_ids)
    positions = sum(len(target[i]) - 1 for i in range(len(pieces)))
    # exactly one more aligned position per piece: the start
    assert coverage["s"] * positions == pytest.approx(coverage["s0"] * positions + len(pieces))
