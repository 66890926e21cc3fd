"""MLflow tracking on a SQLite store under tmp_path, and once against a real `mlflow server`."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from support import free_port, running_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusellm import tracking
from fusellm.settings import LOCALHOST, sqlite_uri
from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer
from fusellm.tracking import (
    TrackingError,
    champion_decision,
    fusion_run,
    is_secret_key,
    load_registered,
    log_and_register_model,
    log_artifact,
    log_json,
    log_metrics,
    stage_run,
)

SECRET = "hf_SuperSecretValue123"
TEXTS = ["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1"] * 20


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """A migrated empty store, copied per test: building the schema costs seconds each time."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=sqlite_uri(db)).search_experiments()
    return db


@pytest.fixture
def store(template_db, tmp_path, monkeypatch) -> Path:
    """MLFLOW_TRACKING_URI -> a fresh SQLite file under tmp_path; cwd is tmp_path/cwd."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(template_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(db))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return db


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    tok = train_tokenizer(TEXTS, kind="bytelevel", vocab_size=300)
    model = tiny_model("gpt2", tok, seed=3, hidden=16, layers=1, heads=2, max_positions=64)
    return save_tiny(model, tok, tmp_path_factory.mktemp("tiny") / "model")


def _register(name, score, sources, lower_is_better, model_dir):
    with fusion_run(f"fuse-{score}"):
        return log_and_register_model(
            model_dir,
            registered_name=name,
            primary_metric="bpb" if lower_is_better else "acc",
            scores={"fused": score, **sources},
            fused="fused",
            sources=list(sources),
            lower_is_better=lower_is_better,
        )


def _champion(name):
    return int(MlflowClient().get_model_version_by_alias(name, "champion").version)


def _role(name, version):
    return MlflowClient().get_model_version(name, str(version)).tags[tracking.TAG_ROLE]


def _alias(name, alias):
    return int(MlflowClient().get_model_version_by_alias(name, alias).version)


# --- runs, params, secrets -----------------------------------------------------------------


def test_secret_keys_are_recognised_word_by_word():
    for key in [
        "api_key",
        "hf_token",
        "AWS_SECRET_ACCESS_KEY",
        "dbPassword",
        "s3.credentials",
        "apikey",
    ]:
        assert is_secret_key(key), key
    for key in ["tokenizer", "max_tokens", "top_k", "training.lam", "keyword_count"]:
        assert not is_secret_key(key), key


def test_parent_and_nested_runs_hold_params_tags_metrics_artifacts(store, tmp_path):
    report = tmp_path / "coverage.txt"
    report.write_text("coverage 0.91\n")
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "bbh.csv").write_text("task,acc\nbbh,0.4\n")
    params = {
        "training": {"lam": 0.9, "lr": 1e-5},
        "sources": [{"name": "llama", "tokenizer": "spm"}, {"name": "mpt", "tokenizer": "bpe"}],
        "top_k": 10,
    }
    tags = {"fusellm.corpus_sha256": "ab" * 32, "fusellm.source.llama.revision": "r1"}
    with (
        fusion_run("fusion-1", params=params, tags=tags) as parent,
        stage_run("align", params={"method": "offsets"}) as child,
    ):
        log_metrics({"coverage": 0.91, "exact_map_rate": 0.8}, prefix="align/llama")
        for step, loss in enumerate([3.0, 2.5, 2.0]):
            log_metrics({"loss": loss}, step=step, prefix="train")
        log_artifact(report)
        log_artifact(folder)
        log_json({"exact": 12, "mined": 3}, "vocab/llama.json")

    client = MlflowClient()
    top = client.get_run(parent)
    assert top.info.status == "FINISHED"
    assert top.data.params["training.lam"] == "0.9"
    assert top.data.params["sources.1.name"] == "mpt"
    assert top.data.params["top_k"] == "10"
    assert top.data.tags["fusellm.corpus_sha256"] == "ab" * 32
    assert top.data.tags["fusellm.source.llama.revision"] == "r1"
    assert top.data.tags[tracking.TAG_CODE_VERSION].startswith("fusellm ")
    config = json.loads(
        Path(client.download_artifacts(parent, "config.json", str(tmp_path))).read_text()
    )
    assert config["training"]["lam"] == 0.9

    stage = client.get_run(child)
    assert stage.data.tags["mlflow.parentRunId"] == parent
    assert stage.data.tags[tracking.TAG_STAGE] == "align"
    assert stage.data.params == {"method": "offsets"}
    assert stage.data.metrics["align/llama/coverage"] == pytest.approx(0.91)
    history = client.get_metric_history(child, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.5), (2, 2.0)]
    names = {a.path for a in client.list_artifacts(child)}
    assert names == {"coverage.txt", "tables", "vocab"}
    assert [a.path for a in client.list_artifacts(child, "tables")] == ["tables/bbh.csv"]
    vocab = client.download_artifacts(child, "vocab/llama.json", str(tmp_path / "dl"))
    assert json.loads(Path(vocab).read_text()) == {"exact": 12, "mined": 3}
    # artifacts sit next to the database, never in the working directory
    assert stage.info.artifact_uri.startswith((store.parent / "mlartifacts").as_uri())
    assert list(Path.cwd().iterdir()) == []


def test_secrets_never_reach_the_store(store, tmp_path):
    params = {
        "sources": [{"name": "a", "hf_token": SECRET}],
        "s3": {"endpoint": f"http://user:{SECRET}@127.0.0.1:9000", "aws_secret_access_key": SECRET},
        "api_key": SECRET,
    }
    with (
        fusion_run("f", params=params, tags={"auth_token": SECRET, "ok": "yes"}) as parent,
        stage_run("s", params={"password": SECRET}, tags={"credential": SECRET}),
    ):
        pass
    run = MlflowClient().get_run(parent)
    assert run.data.params["s3.endpoint"] == "http://user:***@127.0.0.1:9000"
    assert run.data.params["sources.0.name"] == "a"
    assert run.data.tags["ok"] == "yes"
    # nothing on disk holds the secret: not the database, not an artifact
    for path in [*store.parent.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_stage_in_a_worker_thread_nests_under_the_fusion(store):
    seen = {}

    def stage():
        with stage_run("extract") as run_id:
            log_metrics({"tokens": 100.0})
            seen["id"] = run_id

    with fusion_run("threaded") as parent:
        worker = threading.Thread(target=stage)
        worker.start()
        worker.join()
    run = MlflowClient().get_run(seen["id"])
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.metrics["tokens"] == 100.0


def test_stage_with_explicit_parent_and_alone(store):
    with fusion_run("p") as parent:
        pass
    with stage_run("evaluate", parent_run_id=parent) as child:
        pass
    with stage_run("standalone") as alone:
        pass
    client = MlflowClient()
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert "mlflow.parentRunId" not in client.get_run(alone).data.tags
    assert client.get_run(alone).info.experiment_id == client.get_run(parent).info.experiment_id


def test_failed_block_marks_the_run_failed(store):
    with pytest.raises(ZeroDivisionError), fusion_run("boom") as parent:
        _ = 1 / 0
    assert MlflowClient().get_run(parent).info.status == "FAILED"


def test_logging_without_a_run_or_with_bad_values_is_refused(store, tmp_path):
    with pytest.raises(TrackingError, match="fusion_run"):
        log_metrics({"x": 1.0})
    with pytest.raises(TrackingError, match="fusion_run"):
        log_json({}, "x.json")
    with fusion_run("r"):
        with pytest.raises(TypeError, match="'acc'"):
            log_metrics({"ok": 1.0, "acc": "high"})
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            log_artifact(tmp_path / "missing.txt")


# --- champion / challenger ------------------------------------------------------------------


def test_champion_decision_rules():
    assert champion_decision(1.0, {"a": 2.0}, None, lower_is_better=True)[0]
    assert not champion_decision(1.0, {"a": 0.9}, None, lower_is_better=True)[0]
    assert not champion_decision(1.0, {"a": 2.0}, 1.0, lower_is_better=True)[0]  # a tie
    assert champion_decision(0.7, {"a": 0.5}, 0.6, lower_is_better=False)[0]
    ok, reason = champion_decision(0.7, {"a": 0.8, "b": 0.1}, None, lower_is_better=False)
    assert not ok and "a=0.8" in reason and "b=" not in reason


def test_registry_lower_is_better(store, tiny_dir):
    name = "fused-bpb"
    sources = {"llama": 2.0, "mpt": 1.5}
    first = _register(name, 1.2, sources, True, tiny_dir)
    assert first.is_champion and first.version == 1 and _champion(name) == 1
    worse = _register(name, 1.3, sources, True, tiny_dir)
    assert not worse.is_champion and _champion(name) == 1
    assert _role(name, 2) == "challenger" and "champion" in worse.reason
    assert _alias(name, "challenger") == 2  # an alias, not only a tag
    better = _register(name, 1.0, sources, True, tiny_dir)
    assert better.is_champion and _champion(name) == 3
    assert "replaces version 1" in better.reason
    # beats the champion (1.0) but not the new, stronger source (0.8)
    lost = _register(name, 0.9, {"llama": 0.8, "mpt": 1.5}, True, tiny_dir)
    assert not lost.is_champion and _champion(name) == 3 and "llama" in lost.reason
    assert _alias(name, "challenger") == 4  # moved to the newest version that did not win
    version = MlflowClient().get_model_version(name, "3")
    assert version.tags[tracking.TAG_METRIC] == "bpb"
    assert float(version.tags[tracking.TAG_METRIC_VALUE]) == 1.0
    assert version.tags["fusellm.sources"] == "llama,mpt"  # a name queries rely on
    assert float(version.tags["fusellm.source_score.mpt"]) == 1.5


def test_registry_higher_is_better(store, tiny_dir):
    name = "fused-acc"
    # the first version loses to a source: no champion yet
    first = _register(name, 0.40, {"llama": 0.45}, False, tiny_dir)
    assert not first.is_champion and _role(name, 1) == "challenger"
    assert _alias(name, "challenger") == 1
    with pytest.raises(MlflowException, match="champion"):
        _champion(name)
    second = _register(name, 0.50, {"llama": 0.45}, False, tiny_dir)
    assert second.is_champion and _champion(name) == 2
    worse = _register(name, 0.48, {"llama": 0.45}, False, tiny_dir)
    assert not worse.is_champion and _champion(name) == 2
    better = _register(name, 0.60, {"llama": 0.45}, False, tiny_dir)
    assert better.is_champion and _champion(name) == 4 and _role(name, 4) == "champion"
    lost = _register(name, 0.70, {"llama": 0.75}, False, tiny_dir)
    assert not lost.is_champion and _champion(name) == 4


def test_champion_scored_on_another_metric_is_not_replaced(store, tiny_dir):
    name = "fused-switch"
    assert _register(name, 1.0, {"a": 2.0}, True, tiny_dir).is_champion  # bpb
    other = _register(name, 0.9, {"a": 0.1}, False, tiny_dir)  # acc, beats the source
    assert not other.is_champion and "'bpb'" in other.reason and _champion(name) == 1


def _register_result(name, key, tiny_dir, score=1.0):
    with fusion_run(f"fuse-{key}"):
        return log_and_register_model(
            tiny_dir, registered_name=name, primary_metric="bpb",
            scores={"fused": score, "a": 2.0}, fused="fused", sources=["a"],
            lower_is_better=True, result_key=key,
        )  # fmt: skip


def test_one_version_per_result_key(store, tiny_dir):
    name = "fused-once"
    first = _register_result(name, "k1", tiny_dir)
    again = _register_result(name, "k1", tiny_dir)
    assert (again.version, again.is_champion) == (first.version, True)
    assert "registered earlier" in again.reason
    other = _register_result(name, "k2", tiny_dir, score=0.5)  # a distinct result: a version
    assert other.version == first.version + 1 and other.is_champion
    assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == 2
    with fusion_run("again") as run_id:  # a run that finds its result registered names it
        log_and_register_model(
            tiny_dir, registered_name=name, primary_metric="bpb", scores={"fused": 1.0, "a": 2.0},
            fused="fused", sources=["a"], lower_is_better=True, result_key="k1",
        )  # fmt: skip
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["fusellm.registered_version"] == str(first.version)


def test_a_half_registered_version_is_finished_not_duplicated(store, tiny_dir):
    """A run killed after registering the version but before deciding its role: the re-run
    finishes that version (alias, description, role) instead of registering another."""
    name = "fused-half"
    first = _register_result(name, "k", tiny_dir)
    client = MlflowClient()
    client.delete_model_version_tag(name, str(first.version), tracking.TAG_ROLE)
    client.delete_registered_model_alias(name, "champion")
    finished = _register_result(name, "k", tiny_dir)
    assert finished.version == first.version and finished.is_champion
    assert _role(name, first.version) == "champion" and _champion(name) == first.version
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    # a run that lost a race and was killed before deleting its version left it unfinished
    source = client.get_model_version(name, str(first.version)).source
    client.create_model_version(name, source, tags={tracking.registry.TAG_RESULT: "k"})
    assert _register_result(name, "k", tiny_dir).version == first.version
    assert [int(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [
        first.version
    ]


def test_a_race_for_the_same_result_keeps_the_earlier_version(store, tiny_dir, monkeypatch):
    """Two runs register the same result at once: the later version is deleted and both get
    the earlier one."""
    from fusellm.tracking import registry

    name = "fused-race"
    real = registry._log_and_register

    def racing(*args):
        real(*args)  # the other run's version lands first...
        return real(*args)  # ...then ours (or a crashed run's, left unfinished)

    monkeypatch.setattr(registry, "_log_and_register", racing)
    result = _register_result(name, "k", tiny_dir)
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    assert [int(v.version) for v in versions] == [1] and result.version == 1
    assert _role(name, 1) == "champion"


def test_bad_registration_input_fails_before_logging(store, tiny_dir, tmp_path):
    with fusion_run("bad") as parent:
        with pytest.raises(ValueError, match="'mpt'"):
            log_and_register_model(
                tiny_dir,
                registered_name="x",
                primary_metric="bpb",
                scores={"fused": 1.0},
                fused="fused",
                sources=["mpt"],
                lower_is_better=True,
            )
        with pytest.raises(ValueError, match="finite"):
            log_and_register_model(
                tiny_dir,
                registered_name="x",
                primary_metric="bpb",
                scores={"fused": float("nan"), "mpt": 1.0},
                fused="fused",
                sources=["mpt"],
                lower_is_better=True,
            )
        with pytest.raises(FileNotFoundError, match="config.json"):
            log_and_register_model(
                tmp_path, registered_name="x", primary_metric="bpb",
                scores={"fused": 1.0, "mpt": 2.0}, fused="fused", sources=["mpt"],
                lower_is_better=True,
            )  # fmt: skip
    client = MlflowClient()
    assert client.search_registered_models() == []
    assert client.list_artifacts(parent) == []


def test_load_registered_round_trips_a_tiny_model(store, tiny_dir, tmp_path):
    result = _register("roundtrip", 1.0, {"a": 2.0}, True, tiny_dir)
    model, tokenizer = load_registered("roundtrip", dst_path=tmp_path / "dl")
    assert any((tmp_path / "dl").rglob("*.safetensors"))
    assert not any((tmp_path / "dl").rglob("*.bin"))
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    text = "def f(x): return the lazy fox"
    reference = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert not model.training
    # the same model through an explicit version number, and a clear error for a missing alias
    assert result.model_uri.startswith("models:/")
    with pytest.raises(TrackingError, match="no version of registered model 'roundtrip'"):
        load_registered("roundtrip", alias="nightly")


# --- a real MLflow server over HTTP ---------------------------------------------------------


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """`mlflow server` on 127.0.0.1 with SQLite and a local artifact destination."""
    port = free_port()
    url = f"http://{LOCALHOST}:{port}"
    artifacts = tmp_path / "server-artifacts"
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", sqlite_uri(tmp_path / "server.db"),
        "--artifacts-destination", str(artifacts),
        "--host", LOCALHOST, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with running_server(
        argv,
        tmp_path / "server.log",
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        unset=["MLFLOW_TRACKING_URI"],
        health_url=f"{url}/health",
        timeout=90,
        name="mlflow server",
        stop_signal=signal.SIGINT,
        grace_s=20,
    ):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.chdir(tmp_path)
        yield url, artifacts


@pytest.mark.slow
def test_register_through_a_real_server(mlflow_server, tiny_dir, tmp_path):
    url, artifacts = mlflow_server
    with (
        fusion_run("served", params={"training": {"lam": 0.9}, "token": SECRET}) as parent,
        stage_run("register"),
    ):
        log_metrics({"bpb": 1.1}, prefix="eval")
        result = log_and_register_model(
            tiny_dir, registered_name="fused-served", primary_metric="bpb",
            scores={"fused": 1.1, "llama": 1.4}, fused="fused", sources=["llama"],
            lower_is_better=True,
        )  # fmt: skip
    assert result.is_champion
    client = MlflowClient(tracking_uri=url)
    assert (
        int(client.get_model_version_by_alias("fused-served", "champion").version) == result.version
    )
    assert "token" not in client.get_run(parent).data.params
    # the weights travelled over HTTP into the server's artifact destination
    assert any(artifacts.rglob("model.safetensors"))
    model, _ = load_registered("fused-served")
    assert model.config.n_embd == 16


def test_a_deleted_experiment_is_named_in_the_error(store):
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("gone"))
    with (
        pytest.raises(TrackingError, match="'gone' is deleted"),
        fusion_run("x", experiment="gone"),
    ):
        pass


# --- what the fusion run shows: registered version, description, datasets, system metrics ----


def test_the_model_is_logged_in_the_fusion_run_not_the_stage_run(store, tiny_dir):
    """The fusion's own run page lists the registered version, even when registering inside a
    stage run."""
    with fusion_run("fusion") as parent, stage_run("register") as child:
        result = log_and_register_model(
            tiny_dir,
            registered_name="fused-here",
            primary_metric="bpb",
            scores={"fused": 1.0, "a": 2.0},
            fused="fused",
            sources=["a"],
            lower_is_better=True,
        )
    version = MlflowClient().get_model_version("fused-here", str(result.version))
    assert version.run_id == parent != child
    assert MlflowClient().get_run(parent).data.tags["fusellm.registered_version"] == "1"


def test_fusion_markdown_links_decision_and_table():
    comparison = (
        "# FuseLLM comparison\n\n### local: bits_per_byte\n\n| Task | fused |\n| --- | ---: |\n"
    )
    registration = {"name": "m", "version": 3, "is_champion": False, "reason": "loses to a"}
    page = tracking.fusion_markdown(
        "demo-1a2b3c4d-20260101-000000",
        comparison_md=comparison,
        registration=registration,
        links={"MLflow run": "http://127.0.0.1:5000/#/experiments/1/runs/abc", "none": ""},
    )
    assert page.startswith("# demo-1a2b3c4d-20260101-000000\n")
    assert "Version 3 of `m` is the **challenger** (alias `@challenger`): loses to a." in page
    assert "- [MLflow run](http://127.0.0.1:5000/#/experiments/1/runs/abc)" in page
    assert "[none]" not in page  # links without a URL are left out
    assert "FuseLLM comparison" not in page and "| Task | fused |" in page
    assert "Not registered" in tracking.fusion_markdown(
        "x", comparison_md=None, registration=None, links={}
    )


def test_links_point_at_the_mlflow_ui(store, monkeypatch):
    monkeypatch.setenv("FUSELLM_MLFLOW_UI_URL", "http://127.0.0.1:5123/")
    with fusion_run("linked", experiment="linked") as run_id:
        pass
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    assert tracking.run_url(run_id) == (
        f"http://127.0.0.1:5123/#/experiments/{experiment}/runs/{run_id}"
    )
    assert (
        tracking.model_version_url("a b/c", 2)
        == "http://127.0.0.1:5123/#/models/a%20b%2Fc/versions/2"
    )


def test_description_is_the_runs_note_cut_to_what_a_tag_holds(store):
    with fusion_run("described") as run_id:
        tracking.set_description("# title\n\n| a | b |\n")
    assert (
        MlflowClient().get_run(run_id).data.tags["mlflow.note.content"] == "# title\n\n| a | b |\n"
    )
    with fusion_run("long") as run_id:
        tracking.set_description("x" * 20_000)
    note = MlflowClient().get_run(run_id).data.tags["mlflow.note.content"]
    assert len(note) <= 8000 and note.endswith("comparison/comparison.md` artifact)\n")


def test_corpus_and_evaluation_data_are_logged_as_inputs(store, tmp_path):
    from fusellm.config import parse_fusion_config

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    (tmp_path / "model").mkdir()
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    config = parse_fusion_config(
        {
            "target": {"uri": str(tmp_path / "model")},
            "sources": [{"uri": str(tmp_path / "model"), "name": "a"}],
            "corpus": {"uri": str(corpus)},
            "evaluation": {"suites": ["local"], "data_dir": str(eval_dir)},
        }
    )
    with fusion_run("inputs") as run_id:
        assert tracking.log_fusion_inputs(config) == ["corpus", "eval-local"]
    inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    logged = {i.dataset.name: (i.dataset.source_type, json.loads(i.dataset.source)) for i in inputs}
    assert logged == {
        "corpus": ("local", {"uri": str(corpus)}),
        "eval-local": ("local", {"uri": str(eval_dir)}),
    }
    contexts = {i.dataset.name: [t.value for t in i.tags] for i in inputs}
    assert contexts == {"corpus": ["training"], "eval-local": ["evaluation"]}


def test_a_hub_corpus_is_a_hugging_face_dataset_input():
    from fusellm.tracking.inputs import _source

    source = _source("hf://datasets/org/minipile@abc123", split="train")
    assert source._get_source_type() == "hugging_face"
    assert (source.path, source.revision, source.split) == ("org/minipile", "abc123", "train")
    assert _source("s3://bucket/corpus/")._get_source_type() == "s3"


def test_extraction_and_training_runs_record_system_metrics(store, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    with fusion_run("sysmetrics"):
        with stage_run("train_fused") as train:
            time.sleep(1.5)
        with stage_run("evaluate") as evaluate:
            time.sleep(0.5)
    client = MlflowClient()
    assert any(k.startswith("system/") for k in client.get_run(train).data.metrics)
    assert not any(k.startswith("system/") for k in client.get_run(evaluate).data.metrics)


def _first_use(uri: str, barrier) -> str:
    import mlflow

    from fusellm.tracking.runs import ensure_experiment

    mlflow.set_tracking_uri(uri)
    barrier.wait()  # every process meets the fresh store at the same moment
    return ensure_experiment("together")


def test_processes_starting_together_on_a_fresh_sqlite_store_all_succeed(tmp_path):
    """MLflow creates a SQLite store's tables on first use without a guard; the project's first
    use holds a lock, so fusions started together do not fail with "table already exists"."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    uri = sqlite_uri(tmp_path / "fresh.db")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            ids = pool.starmap(_first_use, [(uri, barrier)] * 4)
    assert len(set(ids)) == 1  # one experiment, found or created by each
