"""The real recipe (`fusellm.demo.real`): its checked-in config, and one run through the flow.

Fast: configs/real-small.yaml is what `real_small_config` generates, so the file and the recipe
never drift apart. Slow: the three real pretrained models (SmolLM2-135M-Instruct, Gemma-3-270M,
Qwen2.5-Coder-0.5B-Instruct, fetched into the cache when missing) fused at the smallest size
through the Prefect `fuse` flow, with MLflow on SQLite: six short real documents, one shard,
two optimizer steps, the `local` suite on one held-out document per task. Checked: the flow
completes, each model's extraction records its own document frame, the fused model is a version
of the registered model, and it loads back from MLflow and generates text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fusellm.demo.real import REAL_MODELS, REAL_RECIPE, real_config, real_small_config

REPO = Path(__file__).resolve().parents[1]
REAL_SMALL = REPO / "configs" / "real-small.yaml"

# what each real tokenizer frames a document with (fusellm.data.framing): Gemma's own BOS; no
# chat-turn marker (SmolLM2's <|im_start|>, <|im_end|>), the document separator instead
FRAMES = {
    "smollm2": ("<|endoftext|>", "<|endoftext|>"),
    "gemma3": ("<bos>", "<eos>"),
    "qwen-coder": ("<|endoftext|>", "<|endoftext|>"),
}


def test_real_small_yaml_is_the_recipes_config():
    from fusellm.config import parse_fusion_config

    on_disk = yaml.safe_load(REAL_SMALL.read_text())
    generated = real_small_config()
    assert on_disk == generated, "regenerate configs/real-small.yaml (real_small_config's doc)"
    assert on_disk["target"]["uri"] == f"~/.cache/fusellm/models/{REAL_MODELS['smollm2']}"
    assert [s["name"] for s in on_disk["sources"]] == list(REAL_MODELS)
    assert on_disk["pieces"]["block_size"] == REAL_RECIPE.block_size
    assert on_disk["training"]["max_steps"] == REAL_RECIPE.steps
    parse_fusion_config(on_disk, source=str(REAL_SMALL))  # valid as it stands


# --- the real models through the fuse flow, at the smallest size ---------------------------


def _smallest(root: Path, uri: str) -> dict:
    """The real recipe's config at its smallest: what `make demo-real` runs, minus the size."""
    from fusellm.demo.data import load_split
    from fusellm.demo.real import real_sources
    from fusellm.demo.run import demo_config, write_eval_data

    texts = [
        doc[:300]
        for domain in ("docs", "code", "docstrings")
        for doc in load_split(domain, "fusion", max_bytes=20_000)[:2]
    ]
    corpus = root / "data" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True)
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    counts = write_eval_data(root / "data" / "eval", max_bytes=2_500)
    assert min(counts.values()) >= 1, counts
    recipe = REAL_RECIPE.model_copy(
        update={"block_size": 128, "margin": 8, "top_k": 4, "batch": 2, "steps": 2}
    )
    raw = real_config(
        demo_config(
            recipe,
            real_sources(progress=False),
            corpus=corpus,
            eval_dir=root / "data" / "eval",
            workdir=root / "work",
        )
    )
    raw["extraction"]["shard_size"] = 64  # one shard
    raw["fusion"]["workers"] = 1  # one shard: no process pool
    raw["evaluation"]["limit"] = 1
    raw["tracking"].update(tracking_uri=uri, register_model=True)
    return raw


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_models_fuse_register_and_load_back(tmp_path, monkeypatch):
    """`fusellm run` on the config, in a process of its own (its own Prefect home and local
    API, as a user runs it), then the registered model loaded back here."""
    import torch
    from mlflow import MlflowClient

    from fusellm.config import parse_fusion_config
    from fusellm.testing.faults import run_summary, start_run
    from fusellm.tracking import load_registered

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    raw = _smallest(tmp_path, uri)
    config_file = tmp_path / "real-smallest.yaml"
    config_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = parse_fusion_config(raw)
    log = tmp_path / "run.log"
    proc = start_run(config_file, log, tmp_path / "home")
    assert proc.wait(timeout=1500) == 0, log.read_text()[-3000:]
    summary = run_summary(config.workdir)

    # the flow ran every stage once: one shard, three models, two trainings, five evaluations
    (pieces,) = config.workdir.glob("pieces/*/stage.json")
    assert json.loads(pieces.read_text())["info"]["shards"] == 1
    assert summary["computed"]["train"] == 2  # fused and CLM baseline
    assert set(summary["scores"]) == {"fused", "baseline", *REAL_MODELS}

    # each model read the pieces framed as its own pretraining documents
    frames = {}
    for record in config.workdir.glob("extract/*/stage.json"):
        info = json.loads(record.read_text())["info"]
        frames[info["model"]] = (info["document_start"], info["document_end"])
    assert frames == FRAMES

    # registered, and the version loads back from MLflow with transformers
    registration = summary["registration"]
    name, version = registration["name"], registration["version"]
    assert name == "fusellm-demo-real-fused"
    client = MlflowClient(uri)
    assert client.get_model_version(name, str(version)).run_id == summary["run_id"]
    alias = "champion" if registration["is_champion"] else "challenger"
    assert str(client.get_model_version_by_alias(name, alias).version) == str(version)
    model, tokenizer = load_registered(name, alias)
    assert model.config.model_type == "llama"
    assert len(tokenizer) == 49_152  # SmolLM2's vocabulary: the target's

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    new = out[0, prompt["input_ids"].shape[1] :]
    assert len(new) >= 3, new
    assert tokenizer.decode(new, skip_special_tokens=True).strip(), new
