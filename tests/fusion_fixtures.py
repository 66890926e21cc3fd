"""Tiny fusions for the orchestration tests: two small sources with different tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from support import tiny_texts

from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

EVAL_DATA = Path(__file__).parent / "data" / "eval"


def corpus_texts(n: int = 12, seed: int = 0) -> list[str]:
    return tiny_texts(n, seed, lengths=(20, 60))


def champion_texts() -> list[str]:
    """A corpus holding the held-out texts of the `local` suite: a few training steps then make
    the fused model beat every source for sure, which is what moves the `champion` alias (for
    tests of the plumbing of registration, not of the method's gains)."""
    held_out = [
        json.loads(line)["text"]
        for domain in ("docs", "code", "docstrings")
        for line in (EVAL_DATA / "fusellm" / "local" / domain / "test.jsonl")
        .read_text()
        .splitlines()
    ]
    return corpus_texts(6) + held_out * 4


def write_corpus(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return folder


def build_models(root: Path, texts: list[str]) -> dict[str, Path]:
    """A Llama-style source (SentencePiece BPE) and a GPT-NeoX-style one (byte-level BPE)."""
    spm = train_tokenizer(texts, kind="spm", vocab_size=300)
    byte = train_tokenizer(texts, kind="bytelevel", vocab_size=400)
    small = {"hidden": 32, "layers": 1, "heads": 2, "max_positions": 256}
    save_tiny(tiny_model("llama", spm, seed=0, **small), spm, root / "llama")
    save_tiny(tiny_model("gpt_neox", byte, seed=1, **small), byte, root / "neox")
    return {"llama": root / "llama", "neox": root / "neox"}


def tiny_hub_model(
    cache: Path, repo_id: str = "org/tiny", sha: str = "0123456789abcdef0123456789abcdef01234567"
) -> Path:
    """A tiny GPT-NeoX-style model (byte-level BPE, 300 ids, trained on `corpus_texts()`) in a
    Hugging Face Hub cache at `cache`, as `repo_id` at commit `sha` with `refs/main` naming it;
    returns its snapshot folder (named `sha`)."""
    tok = train_tokenizer(corpus_texts(), kind="bytelevel", vocab_size=300)
    model = tiny_model("gpt_neox", tok, seed=0, hidden=32, layers=1, heads=2, max_positions=128)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    save_tiny(model, tok, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def reseed_model(path: Path, seed: int) -> None:
    """New weights, same tokenizer and architecture: a source that was retrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    arch = AutoModelForCausalLM.from_pretrained(path).config.model_type
    save_tiny(
        tiny_model(arch, tok, seed=seed, hidden=32, layers=1, heads=2, max_positions=256), tok, path
    )


def fusion_dict(models: dict[str, str], corpus: str, workdir: Path, tracking_uri: str) -> dict:
    """A whole FusionConfig as data: target = the Llama-style source, both sources fused into it."""
    return {
        "name": "tiny-fusion",
        "target": {"uri": models["llama"]},
        "sources": [
            {"uri": models["llama"], "name": "llama"},
            {"uri": models["neox"], "name": "neox"},
        ],
        "corpus": {"uri": corpus},
        "pieces": {"block_size": 64, "margin": 8},
        "extraction": {"top_k": 4, "shard_size": 12, "batch_size": 4, "device": "cpu"},
        "fusion": {"workers": 1},  # tiny shards: a process pool would cost more than it saves
        "training": {
            "global_batch": 4,
            "micro_batch": 2,
            "max_steps": 1500,
            "max_length": 64,
            "zero_stage": 0,
            "gradient_checkpointing": False,
            "checkpoint_every": 100,
            "learning_rate": 1e-3,
        },
        "evaluation": {"suites": ["local"], "data_dir": str(EVAL_DATA), "limit": 2},
        "tracking": {
            "experiment": "tiny",
            "registered_model": "tiny-fused",
            "tracking_uri": tracking_uri,
        },
        "workdir": str(workdir),
    }


def write_chat_corpus(folder: Path, convs: list[list[dict]]) -> Path:
    """Conversations as a JSONL chat corpus (`corpus.format: chat`), one record each."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"messages": c, "id": n}) + "\n" for n, c in enumerate(convs))
    (folder / "chats.jsonl").write_text(lines)
    return folder


def chat_exchanges(texts: list[str], words: int = 24) -> list[list[dict]]:
    """One exchange a text: a short request, answered with the text's first `words` words
    (short enough for the tiny models' window in any template)."""
    asks = ("Tell me more.", "Go on, please.", "What comes next?")
    return [
        [{"role": "user", "content": asks[n % len(asks)]},
         {"role": "assistant", "content": " ".join(text.split()[:words])}]
        for n, text in enumerate(texts)
    ]  # fmt: skip


def as_pairwise_chat(data: dict, corpus: str) -> dict:
    """A tiny fusion's config as a FuseChat: the chat corpus at `corpus`, every model in the
    demo's chat template, one pairwise fusion per source besides the target, merged onto the
    target with task arithmetic."""
    from fusellm.demo.run import DEMO_CHAT_TEMPLATE

    def templated(model: dict) -> dict:
        return {**model, "chat_template": DEMO_CHAT_TEMPLATE}

    return {
        **data,
        "target": templated(data["target"]),
        "sources": [templated(m) for m in data["sources"]],
        "corpus": {"uri": corpus, "format": "chat"},
        "pieces": {**data["pieces"], "block_size": 192},
        "training": {**data["training"], "max_length": 192},
        "fusion": {**data["fusion"], "mode": "pairwise"},
        "merge": {"method": "task_arithmetic"},
    }


def write_fault_config(root: Path, models: dict, corpus: Path, name: str) -> Path:
    """The tiny fusion the fault-injection tests and benchmark kill and damage, as a JSON file:
    several extraction shards and a training with checkpoints to resume from."""
    data = fusion_dict(models, str(corpus), root / name, "unused")
    data["extraction"]["shard_size"] = 6
    data["training"].update(max_steps=24, checkpoint_every=4)
    path = root / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def write_run_config(root: Path, models: dict, corpus: Path, name: str) -> Path:
    """The tiny fusion that `fusellm run` is killed in, as YAML: work folder `root/name`, its
    own MLflow store `root/name.db` (`run_tracking_uri`), several extraction shards."""
    data = fusion_dict(models, str(corpus), root / name, run_tracking_uri(root, name))
    data["extraction"]["shard_size"] = 6
    data["training"].update(max_steps=8, checkpoint_every=4)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_tracking_uri(root: Path, name: str) -> str:
    return f"sqlite:///{root / name}.db"


def tiny_inputs(root: Path, prefix: str = "") -> tuple[dict[str, str], Path]:
    """The two tiny sources (as {name: folder}) and a corpus of 8 texts, built under `root`
    (folders `<prefix>models`, `<prefix>corpus`): what most fusion tests start from."""
    texts = corpus_texts(8)
    models = {k: str(v) for k, v in build_models(root / f"{prefix}models", texts).items()}
    return models, write_corpus(root / f"{prefix}corpus", texts)


def tiny_fusion_config(root: Path, tracking_uri: str = "sqlite:///unused.db"):
    """The tiny fusion as a parsed FusionConfig, work folder `root/work`, 8 pieces a shard."""
    from fusellm.config import parse_fusion_config

    models, corpus = tiny_inputs(root)
    data = fusion_dict(models, str(corpus), root / "work", tracking_uri)
    data["extraction"]["shard_size"] = 8
    return parse_fusion_config(data)
