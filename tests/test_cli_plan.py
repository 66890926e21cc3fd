"""Plan before spending: `--set` overrides, `fusellm validate`, `fusellm init` and `fusellm plan`.

The fast tests use configs and tiny files only; those marked slow build a tiny fusion once and
check that the plan says "nothing to do" on it, and after one source is retrained lists exactly
the units a real run then computes, with their reasons. No command may create, download or
write anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fusellm.cli import app
from fusellm.cli.overrides import load_config
from fusellm.config import FusionConfigError

REPO = Path(__file__).resolve().parents[1]
SEVEN_B = REPO / "configs" / "fusellm-7b.yaml"
MINIMAL = {
    "target": {"uri": "models/target"},
    "sources": [{"uri": "models/target", "name": "a"}, {"uri": "hf://org/b@v1", "name": "b"}],
    "corpus": {"uri": "corpus"},
}


def _write(folder: Path, data, name: str = "fusion.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _tree(root: Path) -> dict[str, int]:
    """Every file and folder under `root` with its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------------------------------------
# Overrides


def test_overrides_set_fields_items_and_new_sections(tmp_path):
    path = _write(tmp_path, MINIMAL)
    config = load_config(
        path,
        [
            "sources[1].dtype=float32",
            "training.lam=0.5",
            "evaluation.suites=[local, bbh]",
            "tracking.primary_suite=null",
            "planning.parameters.a=6.74e9",
            "corpus.uri=other-corpus",
        ],
    )
    assert config.sources[1].dtype == "float32" and config.sources[0].dtype == "auto"
    assert config.training.lam == 0.5
    assert config.evaluation.suites == ["local", "bbh"]
    assert config.planning.parameters == {"a": 6.74e9}
    assert config.corpus.uri == str(tmp_path / "other-corpus")  # relative to the file
    assert load_config(path) == load_config(path, [])


def test_override_errors_name_the_file_and_the_override(tmp_path):
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(FusionConfigError) as info:
        load_config(path, ["sources[5].dtype=float32", "nonsense", "training.lam=3"])
    problems = info.value.problems
    assert problems[0] == f"{path}: --set sources[5].dtype: sources has 2 item(s); there is no [5]"
    assert problems[1].startswith(f"{path}: --set 'nonsense': expected FIELD=VALUE")
    assert problems[2].startswith(f"{path}: training.lam: ")
    with pytest.raises(FusionConfigError, match=r"sources\[1\]\.dtype: Input should be"):
        load_config(path, ["sources[1].dtype=float64"])


# ---------------------------------------------------------------------------------------------
# validate


def test_validate_reports_every_problem_at_once_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "target").mkdir(parents=True)
    (tmp_path / "models" / "target" / "config.json").write_text("{}")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.docx").write_text("not a corpus file")
    data = {**MINIMAL, "extraction": {"top_k": 0}, "training": {"micro_batch": 3}}
    path = _write(tmp_path, data).relative_to(tmp_path)  # relative paths: beside the file
    before = _tree(tmp_path)
    result = _invoke("validate", str(path), "--set", "sources[1].dtype=float64")
    assert result.exit_code == 1
    out = result.output
    for field in (
        "extraction.top_k",
        "training.micro_batch",
        "sources[1].dtype",
        "target.uri",  # a folder without weights or tokenizer
        "corpus.uri",  # an unsupported file type
    ):
        assert f"error: {path}: {field}: " in out, (field, out)
    assert "no *.safetensors weights" in out and "no tokenizer" in out and ".docx" in out
    assert f"{path}: invalid: 6 error(s)" in out
    assert _tree(tmp_path) == before  # no work folder, no data folder


def test_a_valid_config_passes(tmp_path):
    path = _write(
        tmp_path,
        {
            **MINIMAL,
            "target": {"uri": "hf://org/t"},
            "sources": [{"uri": "hf://org/t", "name": "t"}],
            "corpus": {"uri": "hf://datasets/org/c"},
        },
    )
    result = _invoke("validate", str(path))
    assert result.exit_code == 0, result.output
    assert f"{path}: valid (0 error(s), 0 warning(s))" in result.output


# ---------------------------------------------------------------------------------------------
# init


def test_init_tiny_is_accepted_and_names_what_to_fill_in(tmp_path):
    path = tmp_path / "fusion.yaml"
    written = _invoke("init", "--output", str(path))
    assert written.exit_code == 0, written.output
    assert (tmp_path / "fusion.schema.json").read_text() == (
        REPO / "configs" / "fusion.schema.json"
    ).read_text()
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=fusion.schema.json\n")
    for placeholder in ("models/base/", "models/other/", "corpus/", "eval/"):
        assert f"#   {placeholder}" in text
    checked = _invoke("validate", str(path))
    assert checked.exit_code == 0, checked.output
    warnings = [line for line in checked.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4 and all("does not exist yet" in w for w in warnings)
    assert _invoke("validate", str(path), "--strict").exit_code == 1
    again = _invoke("init", "--output", str(path))
    assert again.exit_code == 1 and "--force" in again.output


def test_the_shipped_7b_config_is_the_7b_starter(tmp_path):
    from fusellm.cli.starters import starter

    assert SEVEN_B.read_text() == starter("7b", "configs/fusellm-7b.yaml")
    path = tmp_path / "seven.yaml"
    assert _invoke("init", "--recipe", "7b", "-o", str(path)).exit_code == 0
    assert load_config(path).model_dump(exclude={"workdir"}) == load_config(SEVEN_B).model_dump(
        exclude={"workdir"}
    )
    assert _invoke("validate", str(SEVEN_B)).exit_code == 0


# ---------------------------------------------------------------------------------------------
# plan: the 7B recipe offline


def _docs_figure(label: str) -> float:
    text = (REPO / "docs" / "planning.md").read_text()
    return float(re.search(rf"\| {label} \| ([\d.]+)", text).group(1))


def test_plan_of_the_7b_recipe_offline_matches_the_docs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the Hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    result = _invoke("plan", str(SEVEN_B), "--home", str(home), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["stopped"].startswith("identities not resolved")
    assert "hf://mosaicml/mpt-7b" in plan["stopped"]
    total = plan["estimate"]["total"]
    assert total["bytes"] / 1e9 == pytest.approx(_docs_figure("top-k stores, total"), rel=0.25)
    assert total["gpu_hours"] == pytest.approx(_docs_figure("GPU-hours, total"), rel=0.25)
    assert not home.exists() and not (REPO / "configs" / "fusellm-7b-work").exists()
    assert list(tmp_path.iterdir()) == []
    text = _invoke("plan", str(SEVEN_B), "--home", str(home)).output
    assert "identities not resolved" in text and "180.9 GB" in text and "153.1" in text
    slower = json.loads(_invoke("plan", str(SEVEN_B), "--json", "--mfu", "0.2").output)
    assert slower["estimate"]["total"]["gpu_hours"] == pytest.approx(2 * total["gpu_hours"])


def test_plan_without_hints_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    result = _invoke(
        "plan", str(SEVEN_B), "--set", "planning.parameters={}", "--set", "planning.corpus_tokens="
    )
    assert result.exit_code == 0, result.output
    assert "set planning.parameters.mpt-7b (or --set planning.parameters.mpt-7b=7e9)" in (
        result.output
    )
    assert "set planning.corpus_tokens" in result.output


def test_plan_reports_config_errors_with_file_and_field(tmp_path):
    result = _invoke("plan", str(SEVEN_B), "--set", "training.lam=2", "--set", "fusion.method=x")
    assert result.exit_code == 2
    assert f"error: {SEVEN_B}: training.lam: " in result.output
    assert f"error: {SEVEN_B}: fusion.method: " in result.output


def test_store_bytes_per_token_bounds_what_the_store_writes(tmp_path):
    """Format 2 compresses: the planned bytes are an upper bound, within 1.5x, of what the store
    writes on data shaped like a real model's output (model_shaped_records, as
    benchmarks/bench_store.py uses them); ids no model produces, uniformly random, take more."""
    import numpy as np

    from fusellm.cli.estimates import RECORD_BYTES, store_bytes_per_token
    from fusellm.data.store import TopkRecord, write_topk
    from fusellm.testing.synthetic import model_shaped_records

    def written(records, k, vocab, name):
        manifest = write_topk(
            tmp_path / name, records, top_k=k, vocab_size=vocab, meta={}, shard_size=len(records)
        )
        return manifest["tokens"], manifest["bytes"] - len(records) * RECORD_BYTES

    cases = [(10, 32000, True), (10, 32000, False), (10, 262144, True), (1, 50432, True)]
    cases += [(32, 128256, False)]
    for k, vocab, token_ce in cases:
        records, _ = model_shaped_records(16, vocab, k=k, seed=vocab)
        if not token_ce:
            records = [TopkRecord(r.input_ids, r.ids, r.logprobs, r.ce) for r in records]
        tokens, size = written(records, k, vocab, f"zipf-{k}-{vocab}-{token_ce}")
        planned = tokens * store_bytes_per_token(k, token_ce)
        assert size <= planned <= 1.5 * size, (k, vocab, token_ce, size / tokens)

    rng = np.random.default_rng(0)
    for vocab in (32000, 262144):
        records = [
            TopkRecord(
                rng.integers(0, vocab, n),
                rng.integers(0, vocab, (n, 10)),
                np.log(rng.dirichlet(np.ones(11), n)[:, :10]).astype(np.float32),
                1.0,
                rng.random(n).astype(np.float32),
            )
            for n in (3000, 5000)
        ]
        tokens, size = written(records, 10, vocab, f"uniform-{vocab}")
        planned = tokens * store_bytes_per_token(10, True)
        assert planned < size < 1.5 * planned, (vocab, size / tokens)  # ~32 and ~36 a token
    assert store_bytes_per_token(10, False) == 24
    assert store_bytes_per_token(10, True) == 25.5


def test_parameters_from_config_json_and_safetensors(tmp_path):
    from fusellm.cli.estimates import _safetensors_parameters, config_parameters

    llama2 = {
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
        "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "tie_word_embeddings": False, "hidden_act": "silu",
    }  # fmt: skip
    mpt = {"model_type": "mpt", "d_model": 4096, "n_layers": 32, "n_heads": 32,
           "expansion_ratio": 4, "vocab_size": 50432}  # fmt: skip
    assert config_parameters(llama2) == pytest.approx(6_738_415_616, rel=1e-3)
    assert config_parameters(mpt) == pytest.approx(6_649_286_656, rel=1e-3)

    from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

    tok = train_tokenizer(["a tiny corpus of words " * 20], kind="bytelevel", vocab_size=300)
    model = tiny_model("gpt_neox", tok, seed=0, hidden=32, layers=1, heads=2, max_positions=64)
    save_tiny(model, tok, tmp_path / "m")
    exact = _safetensors_parameters(tmp_path / "m")
    assert exact == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# plan: a finished tiny fusion


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A finished tiny fusion (library walk, no registration) and its config file."""
    from fusion_fixtures import build_models, corpus_texts, fusion_dict, write_corpus

    from fusellm.config import parse_fusion_config
    from fusellm.stages import pipeline

    root = tmp_path_factory.mktemp("plan")
    texts = corpus_texts()
    models = build_models(root / "models", texts)
    corpus = write_corpus(root / "corpus", texts)
    data = fusion_dict({k: str(v) for k, v in models.items()}, str(corpus), root / "work", "")
    data["training"].update(max_steps=4, checkpoint_every=4)
    data["tracking"].update(register_model=False, tracking_uri=None)
    data["fusion"]["workers"] = 1
    pipeline.walk(parse_fusion_config(data), pipeline.Executor())
    return _write(root, data), models


def _plan(path: Path) -> dict:
    result = _invoke("plan", str(path), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _pending(plan: dict) -> dict[str, str]:
    """Pending units, shards folded, with their reasons."""
    return {re.sub(r"-shard-\d+$", "", u["label"]): u["reason"] for u in plan["units"]
            if not u["done"]}  # fmt: skip


@pytest.mark.slow
def test_a_finished_fusion_has_nothing_to_do(tiny, monkeypatch):
    path, _ = tiny
    monkeypatch.chdir(path.parent)
    before = _tree(path.parent)
    plan = _plan(path)
    assert plan["nothing_to_do"] and plan["stopped"] is None and _pending(plan) == {}
    assert "nothing to do: all 25 stage units are done" in _invoke("plan", str(path)).output
    assert _invoke("validate", str(path)).exit_code == 0
    assert _tree(path.parent) == before  # read only: no folder, no file, no new mtime
    estimate = plan["estimate"]
    assert {r["status"] for r in estimate["rows"]} == {"done"}
    assert estimate["to_compute"]["gpu_hours"] == 0
    llama = next(m for m in estimate["models"] if m["name"] == "llama")
    assert llama["parameters_from"] == "safetensors headers"
    assert llama["tokens_from"] == "extraction store" and llama["roles"] == ["target", "source"]


@pytest.mark.slow
def test_a_retrained_source_recomputes_what_the_plan_lists(tiny):
    from fusion_fixtures import reseed_model

    from fusellm.stages import pipeline

    path, models = tiny
    reseed_model(models["neox"], seed=11)
    pending = _pending(_plan(path))
    assert pending == {
        "extract-neox": "new key: model neox changed (its files, dtype or trust_remote_code)",
        "store-neox": "input extract-neox-shard-* changes",
        "fuse": "input extract-neox-shard-* changes",
        "fused-data": "input fuse-shard-* changes",
        "train-fused": "input fused-data changes",
        "evaluate-fused-local": "input train-fused changes",
        "evaluate-neox-local": "new key: model neox changed (its files, dtype or trust_remote_code)",
        "compare": "input evaluate-fused-local, evaluate-neox-local change",
    }
    ex = pipeline.Executor()
    pipeline.walk(load_config(path), ex)
    computed = {k: v for k, v in ex.tally.computed().items() if v}
    shards = ex.tally.states["extract"].count("Completed")
    assert computed == {
        "resolve-sources": 1, "fetch-model": 3, "extract": shards, "store": 1, "fuse": shards,
        "fused": 1, "train": 1, "evaluate": 2, "compare": 1,
    }  # fmt: skip
    assert _plan(path)["nothing_to_do"]


def test_plan_reads_hub_models_from_the_cache_only(tmp_path, monkeypatch):
    """A Hub model in the Hugging Face cache: keys and sizes from its files; one not cached
    stops the walk with its name, and nothing is downloaded or written."""
    import shutil

    from fusion_fixtures import EVAL_DATA, corpus_texts, tiny_hub_model, write_corpus
    from transformers import AutoModelForCausalLM

    texts = corpus_texts()
    snapshot = tiny_hub_model(tmp_path / "hf")
    sha = snapshot.name
    model = AutoModelForCausalLM.from_pretrained(snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    data = {
        "target": {"uri": "hf://org/tiny"},
        "sources": [{"uri": "hf://org/tiny", "name": "tiny"}],
        "corpus": {"uri": "corpus"},
        "pieces": {"block_size": 64, "margin": 8},
        "evaluation": {"data_dir": str(EVAL_DATA)},
        "tracking": {"register_model": False},
    }
    write_corpus(tmp_path / "corpus", texts)
    path = _write(tmp_path, data)
    before = _tree(tmp_path)
    plan = _plan(path)
    assert plan["stopped"] is None and plan["identities"]["target"] == f"hub:{sha}"
    assert _pending(plan)["pieces"] == "never built"
    assert _pending(plan)["train-fused"] == "input fused-data changes"
    (tiny,) = plan["estimate"]["models"]
    assert tiny["parameters"] == sum(p.numel() for p in model.parameters())
    assert tiny["parameters_from"] == "safetensors headers" and tiny["vocab_size"] == 300
    shutil.rmtree(snapshot)
    snapshot.mkdir()  # the commit is known, its files are not here
    plan = _plan(path)
    assert plan["stopped"].startswith("target tiny (hf://org/tiny@main) is not in the Hugging")
    assert "downloads nothing" in plan["stopped"] and plan["units"] == []
    assert set(_tree(tmp_path)) <= set(before)  # no work folder, nothing fetched


def test_plan_reads_s3_models_only_from_a_complete_mirror(tmp_path, monkeypatch):
    from fusion_fixtures import EVAL_DATA
    from moto import mock_aws

    from fusellm.io.s3 import fetch_s3, s3_cache_folder, upload_dir
    from fusellm.io.uris import parse_uri
    from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

    for name in ("AWS_ENDPOINT_URL", "FUSELLM_S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    tok = train_tokenizer(["some words for a tokenizer " * 30], kind="bytelevel", vocab_size=280)
    model = tiny_model("gpt_neox", tok, seed=0, hidden=32, layers=1, heads=2, max_positions=64)
    save_tiny(model, tok, tmp_path / "model")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some words for a tokenizer\n" * 40)
    uri = "s3://models/tiny/"
    data = {
        "target": {"uri": uri},
        "sources": [{"uri": uri, "name": "tiny"}],
        "corpus": {"uri": "corpus"},
        "pieces": {"block_size": 64, "margin": 8},
        "evaluation": {"data_dir": str(EVAL_DATA)},
        "tracking": {"register_model": False},
    }
    path = _write(tmp_path, data)
    with mock_aws():
        import boto3

        boto3.client("s3").create_bucket(Bucket="models")
        upload_dir(tmp_path / "model", uri)
        plan = _plan(path)
        assert plan["stopped"].startswith(f"target tiny ({uri}) has no complete mirror")
        assert not (tmp_path / "fusellm-work").exists()
        parsed = parse_uri(uri)
        mirror = s3_cache_folder(tmp_path / "fusellm-work" / "cache", parsed)
        fetch_s3(parsed, mirror)  # what a run leaves behind
        before = _tree(tmp_path)
        plan = _plan(path)
        assert plan["stopped"] is None and _pending(plan)["pieces"] == "never built"
        assert plan["estimate"]["models"][0]["parameters_from"] == "safetensors headers"
        assert _tree(tmp_path) == before


def test_plan_projects_the_cpu_stages_as_docs_scaling_does(tmp_path, monkeypatch):
    """MiniPile on 64 cores: pieces + align-and-fuse in the plan as in docs/scaling.md §3."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.chdir(tmp_path)
    sets = ["--set", "pieces.workers=64", "--set", "fusion.workers=64"]
    result = _invoke("plan", str(SEVEN_B), "--home", str(tmp_path / "h"), "--json", *sets)
    assert result.exit_code == 0, result.output
    cpu = json.loads(result.output)["estimate"]["cpu"]
    assert cpu["text_bytes"] == pytest.approx(7.2e9)  # 1.8e9 planned tokens x 4 bytes
    assert cpu["workers"] == {"pieces": 64, "align_fuse": 64}
    text = (REPO / "docs" / "scaling.md").read_text()
    pieces_s = float(re.search(r"\| pieces, 64 workers \| .* \| ([\d,]+) \|", text)[1].replace(",", ""))
    fuse_row = re.search(r"\| align-and-fuse, 64 workers \| .* \| ([\d,]+) \|", text)[1]
    assert cpu["pieces_cpu_hours"] * 3600 / 64 == pytest.approx(pieces_s, rel=0.01)
    # the docs take the slower of per-token and per-byte; the plan projects per byte
    assert cpu["align_fuse_cpu_hours"] * 3600 / 64 == pytest.approx(float(fuse_row), rel=0.01)
    assert cpu["wall_hours"] < 1.0
    shown = _invoke("plan", str(SEVEN_B), "--home", str(tmp_path / "h"), *sets).output
    assert "CPU: pieces" in shown and "on 64 workers" in shown


def test_a_pairwise_chat_plan_lists_each_pair_its_training_and_the_merge(tmp_path, monkeypatch):
    """FuseChat planned before anything runs: one fusion and one training per source besides
    the pivot (K = 2 here), the CLM baseline, the merge of the K models; the estimate has a
    fused store and a training per pair. Nothing is written."""
    import shutil

    from fusion_fixtures import (
        as_pairwise_chat,
        build_models,
        chat_exchanges,
        corpus_texts,
        fusion_dict,
        reseed_model,
        write_chat_corpus,
    )

    texts = corpus_texts()
    models = {k: str(v) for k, v in build_models(tmp_path / "models", texts).items()}
    shutil.copytree(models["llama"], tmp_path / "llama-b")
    reseed_model(tmp_path / "llama-b", 11)
    corpus = write_chat_corpus(tmp_path / "chat", chat_exchanges(texts))
    data = fusion_dict(models, "unused", tmp_path / "work", "")
    data["sources"].append({"uri": str(tmp_path / "llama-b"), "name": "llama-b"})
    data["tracking"].update(register_model=False, tracking_uri=None)
    path = _write(tmp_path, as_pairwise_chat(data, str(corpus)))
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    plan = _plan(path)
    pending = _pending(plan)
    pairs = ("neox", "llama-b")  # the pivot (llama) is no pair of its own
    assert [u for u in pending if u.startswith("train-")] == [
        *(f"train-pair-{p}" for p in pairs), "train-baseline"
    ]  # fmt: skip
    assert pending["merge"] == "input train-pair-neox, train-pair-llama-b change"
    for p in pairs:
        assert pending[f"train-pair-{p}"] == f"input fused-data-pair-{p} changes"
        assert any(u.startswith(f"fuse-pair-{p}-shard") for u in pending)
    assert pending["evaluate-fused-local"] == "input merge changes"
    rows = [(r["stage"], r["what"]) for r in plan["estimate"]["rows"] if r["stage"] != "extract"]
    assert rows == [
        ("fuse", "fused store, pair neox"),
        ("fuse", "fused store, pair llama-b"),
        ("train", "pairwise model neox (lam 0.9)"),
        ("train", "pairwise model llama-b (lam 0.9)"),
        ("train", "CLM baseline (lam 1)"),
    ]
    text = _invoke("plan", str(path)).output
    assert "train-pair-llama-b" in text and re.search(r"compute\s+merge\s", text), text
    assert _tree(tmp_path) == before
