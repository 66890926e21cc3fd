"""`evaluation.backend`: lm-eval's Hugging Face model (default) or its vLLM model.

Without vLLM or a GPU, asking for vllm is a one-line error saying what is missing, raised before
any suite runs. On a CUDA machine with vLLM (`make test-gpu`), both backends score the same model
on the same suite alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusellm.evaluate import run_suite
from fusellm.evaluate.runner import BackendUnavailable, load_lm
from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

DATA = Path(__file__).parent / "data" / "eval"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    texts = [line for p in sorted(DATA.rglob("*.jsonl")) for line in p.read_text().splitlines()]
    tokenizer = train_tokenizer(texts, kind="spm", vocab_size=600)
    model = tiny_model("llama", tokenizer, hidden=64, layers=2, heads=2, max_positions=2048)
    folder = tmp_path_factory.mktemp("backend") / "model"
    save_tiny(model, tokenizer, folder)
    return folder


def test_vllm_without_the_package_names_it(tiny_folder, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(BackendUnavailable, match=r"pip install vllm"):
        load_lm(tiny_folder, backend="vllm")


def test_vllm_without_a_gpu_says_so(tiny_folder, monkeypatch):
    import importlib.util

    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        load_lm(tiny_folder, backend="vllm")


def test_an_unknown_backend_is_refused(tiny_folder):
    with pytest.raises(ValueError, match="expected hf or vllm, got 'tgi'"):
        load_lm(tiny_folder, backend="tgi")


@pytest.mark.gpu
def test_vllm_scores_like_hf_on_a_gpu(tiny_folder, tmp_path):
    """Log-likelihood suites: the same numbers from both engines, up to float rounding."""
    scores = {
        backend: run_suite(
            str(tiny_folder),
            "local",
            data_dir=DATA,
            output_dir=tmp_path / backend,
            limit=4,
            device="cuda",
            backend=backend,
        ).average
        for backend in ("hf", "vllm")
    }
    assert scores["vllm"] == pytest.approx(scores["hf"], rel=2e-3), scores
