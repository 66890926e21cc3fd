"""Three real pretrained LLMs, as the method sees them (fetched once per machine into the cache).

Tiny stand-ins hide what real checkpoints do: Gemma needs its `<bos>`, instruct models name a
chat-turn marker as EOS, Qwen's output layer is untied and padded past its tokenizer. These tests
run extraction on real text and check it against lm-eval's own scoring of the same text.
"""

import math

import numpy as np
import pytest
import torch

from fusellm.data.extract import extract_topk
from fusellm.data.framing import document_frame
from fusellm.data.store import open_topk
from fusellm.demo.data import load_split
from fusellm.demo.real import REAL_MODELS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def texts():
    """Real text of the three domains, a few hundred tokens in all."""
    return [load_split(d, "test", max_bytes=20_000)[0][:400] for d in ("docs", "code", "docstrings")]


def _load(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusellm.io.pretrained import ensure_model

    folder = ensure_model(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _lm_eval_nll(model, tokenizer, texts):
    """Total NLL (nats) lm-eval's rolling log-likelihood gives each text, as our suites call it."""
    from lm_eval.api.instance import Instance

    from fusellm.evaluate.runner import load_lm

    lm = load_lm(model, tokenizer=tokenizer, batch_size=1)
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
        for i, t in enumerate(texts)
    ]
    return [-ll for ll in lm.loglikelihood_rolling(requests, disable_tqdm=True)]


@pytest.mark.parametrize("name", list(REAL_MODELS.values()))
def test_extraction_loss_equals_lm_evals_with_the_models_own_document_start(name, texts, tmp_path):
    model, tok = _load(name)
    frame = document_frame(tok)
    assert frame.start_token in ("<bos>", "<|endoftext|>")  # never a chat marker
    assert frame.end_token in ("<eos>", "<|endoftext|>")
    extract_topk(model, tok, texts, tmp_path, top_k=4, batch_size=1, progress=False)
    store = open_topk(tmp_path)
    reference = _lm_eval_nll(model, tok, texts)
    for i, text in enumerate(texts):
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        record = store[i]
        assert record.input_ids[0] == frame.start and record.input_ids[-1] == frame.end
        ours = float(record.token_ce[:n].astype(np.float64).mean())  # the text's tokens only
        assert ours == pytest.approx(reference[i] / n, abs=1e-3), (name, i)


def test_gemma_without_its_bos_is_the_degraded_teacher_the_frame_fixes(texts, tmp_path):
    """The regression behind the frame: without `<bos>` Gemma 3's loss on real text jumps."""
    model, tok = _load(REAL_MODELS["gemma3"])
    bare = document_frame(tok, start="none")
    extract_topk(model, tok, texts, tmp_path / "bos", top_k=1, progress=False)
    extract_topk(model, tok, texts, tmp_path / "bare", top_k=1, progress=False, frame=bare)
    with_bos, without = open_topk(tmp_path / "bos"), open_topk(tmp_path / "bare")
    for i in range(len(texts)):
        assert without[i].ce > with_bos[i].ce + 0.3, i
        assert math.isfinite(with_bos[i].ce)
