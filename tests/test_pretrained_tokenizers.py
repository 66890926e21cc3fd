"""The three real pretrained models' tokenizers, without their weights: how they frame a
document and how alignment treats the start position (fusellm/data/framing.py)."""

import numpy as np
import pytest

from fusellm.data.framing import document_frame, is_chat_marker
from fusellm.method.align import pair_ends, token_end_chars

EXPECTED = {  # start, end: never a chat marker
    "smollm2": ("<|endoftext|>", "<|endoftext|>"),
    "gemma3": ("<bos>", "<eos>"),
    "qwen-coder": ("<|endoftext|>", "<|endoftext|>"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_real_tokenizer_frames_a_document_as_in_pretraining(pretrained_tokenizers, name):
    tok = pretrained_tokenizers[name]
    frame = document_frame(tok)
    assert (frame.start_token, frame.end_token) == EXPECTED[name]
    assert not is_chat_marker(frame.start_token) and not is_chat_marker(frame.end_token)
    # the frame is what the tokenizer itself adds where it adds anything (Gemma: its <bos>)
    text = "def interfaces(x):\n    return x"
    added = tok(text)["input_ids"][: -len(tok(text, add_special_tokens=False)["input_ids"])]
    assert added in ([], [frame.start])


def test_instruct_eos_is_a_chat_marker_that_the_frame_replaces(pretrained_tokenizers):
    for name in ("smollm2", "qwen-coder"):
        tok = pretrained_tokenizers[name]
        assert tok.eos_token == "<|im_end|>" and is_chat_marker(tok.eos_token)
        assert document_frame(tok).end != tok.eos_token_id


def test_start_positions_and_shared_token_ends_pair_across_real_tokenizers(pretrained_tokenizers):
    """SmolLM2 and Qwen (both byte-level BPE, different merges) on code: the framed start
    positions pair with each other, and every pair joins contexts that end at one character."""
    text = "    def _check_interfaces(self, obj):\n        return isinstance(obj, Iterable)\n"
    _, t_ends = token_end_chars(text, pretrained_tokenizers["smollm2"])
    _, s_ends = token_end_chars(text, pretrained_tokenizers["qwen-coder"], role="source")
    pairs = pair_ends(np.concatenate([[0], t_ends]), np.concatenate([[0], s_ends]))
    assert pairs[0] == 0  # the start positions pair with each other
    paired = pairs[1:] >= 0
    ends = t_ends[paired]
    np.testing.assert_array_equal(ends, s_ends[pairs[1:][paired] - 1])
    assert paired.mean() > 0.5
