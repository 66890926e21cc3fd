"""Common fixtures: the real tokenizers in tests/data/tokenizers and small local corpora."""

from __future__ import annotations

import os
import sysconfig
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing a test does may land in the checkout: MLflow 3 defaults to ./mlflow.db, and the
# project data folder defaults to ./.fusellm. Tests that need their own set them again.
_SCRATCH = tempfile.mkdtemp(prefix="fusellm-tests-")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_SCRATCH}/mlflow.db")
os.environ.setdefault("FUSELLM_HOME", f"{_SCRATCH}/home")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REAL_TOKENIZERS = ("llama-spm", "mpt", "gpt-2")


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """Undo what a test leaves in this process: environment variables and MLflow's globals.

    In-process flows set embedded defaults with os.environ.setdefault, and
    mlflow.set_tracking_uri sets a module global that outranks the environment variable.
    """
    saved = dict(os.environ)
    yield
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    os.environ.clear()
    os.environ.update(saved)


# Real Llama-2, MPT and GPT-2 vocabularies, committed with the tests (see the README.md there).
TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "tokenizers"


@pytest.fixture(scope="session")
def real_tokenizers():
    """name -> fast tokenizer for each real vocabulary (Llama-2 SPM, MPT, GPT-2)."""
    from transformers import AutoTokenizer

    missing = [n for n in REAL_TOKENIZERS if not (TOKENIZER_DIR / n / "tokenizer.json").exists()]
    if missing:
        pytest.fail(f"real tokenizers missing under {TOKENIZER_DIR}: {missing}")
    return {n: AutoTokenizer.from_pretrained(str(TOKENIZER_DIR / n)) for n in REAL_TOKENIZERS}


@pytest.fixture(scope="session")
def english_texts():
    """Paragraphs of the standard library's English documentation."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def code_texts():
    """Source files of the standard library (a fixed, sorted selection)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:40]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


@pytest.fixture(scope="session")
def small_corpus(english_texts, code_texts):
    """A few hundred short mixed pieces (prose and code)."""
    prose = [t[:300] for t in english_texts[:60]]
    code = [t[:300] for t in code_texts[:30]]
    return prose + code


@pytest.fixture(scope="session")
def tiny_tokenizers(small_corpus):
    """Locally trained tokenizers of the three families."""
    from fusellm.testing.tiny import train_tokenizer

    return {
        "spm": train_tokenizer(small_corpus, "spm", 600),
        "bytelevel": train_tokenizer(small_corpus, "bytelevel", 800),
        "wordpiece": train_tokenizer(small_corpus, "wordpiece", 700),
    }
