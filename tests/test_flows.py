"""The Prefect flows end to end, under Prefect's test harness, with MLflow on SQLite.

Tiny models (a Llama-style and a GPT-NeoX-style source, the target is the first), a few dozen
pieces, a few training steps, the `local` evaluation suite on two documents per task. Checked:
the whole fusion runs and is tracked (parent run, nested stage runs, tags, metrics, artifacts,
registered model); an unchanged re-run finds every stage folder (``Cached`` task runs), makes no
folder and trains nothing; changing one source recomputes only that source's extraction, the
fusion, the fused model's training and the evaluations that depend on them; `refusion` does
nothing when nothing changed and re-fuses when a source did; each stage flow runs on its own;
`fusellm run`. Task states and folders prove the reuse; no wall-clock ratio is asserted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fusion_fixtures import build_models, corpus_texts, fusion_dict, reseed_model, write_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect")
    settings = {PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage"}
    with temporary_settings(settings), prefect_test_harness(server_startup_timeout=120):
        yield home


@pytest.fixture(scope="module")
def fusion(tmp_path_factory):
    from fusellm.config import parse_fusion_config

    root = tmp_path_factory.mktemp("fusion")
    texts = corpus_texts()
    models = build_models(root / "models", texts)
    corpus = write_corpus(root / "corpus", texts)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = fusion_dict({k: str(v) for k, v in models.items()}, str(corpus), root / "work", uri)
    data["training"].update(max_steps=6, checkpoint_every=6)
    return parse_fusion_config(data), models, uri


def _folders(workdir: Path) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for p in workdir.glob("*/*") if not p.name.startswith(".")}


def _run(config):
    from fusellm_flows.fuse import fuse

    return fuse(config)


def test_fuse_rerun_and_change_one_source(harness, fusion):
    import mlflow
    from mlflow import MlflowClient

    config, models, uri = fusion
    first = _run(config)
    states = first["states"]
    (pieces,) = config.workdir.glob("pieces/*/stage.json")
    shards = json.loads(pieces.read_text())["info"]["shards"]
    assert shards >= 2
    assert len(states["extract"]) == 2 * shards  # (target = llama source, neox) x shards
    assert first["computed"]["train"] == 2  # fused and CLM baseline
    assert set(first["scores"]) == {"fused", "baseline", "llama", "neox"}
    assert first["registration"]["version"] == 1
    comparison = Path(first["comparison"])
    assert (comparison / "comparison.md").read_text().count("fused") >= 2
    assert (comparison / "comparison.png").stat().st_size > 1000

    # MLflow: parent run with config parameters and source tags, nested stage runs, a version.
    client = MlflowClient(uri)
    parent = client.get_run(first["run_id"])
    assert parent.data.params["training.lam"] == "0.9"
    assert parent.data.tags["fusellm.corpus_sha256"]
    assert parent.data.tags["fusellm.source.neox.revision"].startswith("local:")
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    stages = {r.data.tags["fusellm.stage"]: r for r in children}
    assert {
        "prepare",
        "extract",
        "align_fuse",
        "train_fused",
        "train_baseline",
        "evaluate",
        "register",
    } <= set(stages)
    fusion_metrics = stages["align_fuse"].data.metrics
    assert 0 < fusion_metrics["fusion/neox/aligned_coverage"] <= 1
    assert "fusion/neox/min_ce_win_rate" in fusion_metrics
    assert "local/fused/bits_per_byte" in stages["evaluate"].data.metrics
    history = client.get_metric_history(stages["train_fused"].info.run_id, "train/fused/loss")
    assert [m.step for m in history] == list(range(1, 7))
    artifacts = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id)}
    assert {"comparison", "evaluation"} <= artifacts
    version = client.get_model_version("tiny-fused", "1")
    assert version.tags["fusellm.role"] in ("champion", "challenger")
    _check_results_where_users_look(client, first, parent)

    # An unchanged re-run: every stage folder exists (Cached), nothing trains, no new folder.
    before = _folders(config.workdir)
    second = _run(config)
    assert _folders(config.workdir) == before
    computed = {k: v for k, v in second["computed"].items() if v}
    assert computed == {"resolve-sources": 1, "fetch-model": 3}, second["states"]
    assert second["states"]["train"] == ["Cached", "Cached"]
    assert second["registration"]["version"] == 1  # no duplicate version for the same model

    # One source retrained: its extraction, the fused data, the fused model and the evaluations
    # of the changed models run again; the pieces, the target's store and the baseline do not.
    reseed_model(models["neox"], seed=5)
    third = _run(config)
    new = {f.split("/")[0] for f in _folders(config.workdir) - before}
    assert new == {"extract", "store", "fuse", "fused", "train", "evaluate", "compare", "register"}
    computed = {k: v for k, v in third["computed"].items() if v}
    assert computed == {
        "resolve-sources": 1,
        "fetch-model": 3,
        "extract": shards,
        "store": 1,
        "fuse": shards,
        "fused": 1,
        "train": 1,
        "evaluate": 2,
        "compare": 1,
        "register": 1,
    }, third["states"]
    assert third["scores"]["baseline"] == first["scores"]["baseline"]
    assert third["scores"]["neox"] != first["scores"]["neox"]
    assert third["registration"]["version"] == 2
    mlflow.set_tracking_uri(uri)
    assert client.get_registered_model("tiny-fused").name == "tiny-fused"


def _check_results_where_users_look(client, summary, parent):
    """The run's readable name; the registered version under its alias, logged in the fusion
    run; the run's description; its datasets; the Prefect markdown artifact with the links."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    assert re.fullmatch(r"tiny-fusion-[0-9a-f]{8}-\d{8}-\d{6}", summary["run_name"])
    assert parent.data.tags["fusellm.flow_run"] == summary["run_name"]
    role = summary["registration"]["is_champion"] and "champion" or "challenger"
    assert str(client.get_model_version_by_alias("tiny-fused", role).version) == "1"
    assert client.get_model_version("tiny-fused", "1").run_id == parent.info.run_id
    note = parent.data.tags["mlflow.note.content"]
    assert f"Version 1 of `tiny-fused` is the **{role}**" in note
    assert "fused − CLM" in note and "[Prefect flow run](" in note
    assert {i.dataset.name for i in parent.inputs.dataset_inputs} == {"corpus", "eval-local"}
    links = summary["links"]
    assert links["MLflow run"].endswith(f"/runs/{parent.info.run_id}")
    assert links["Model tiny-fused version 1"].endswith("/#/models/tiny-fused/versions/1")

    async def artifacts():
        async with get_client() as prefect:
            key = ArtifactFilter(key=ArtifactFilterKey(any_=["fusion-tiny-fusion"]))
            return await prefect.read_artifacts(artifact_filter=key)

    import asyncio

    (artifact,) = [
        a for a in asyncio.run(artifacts()) if str(a.flow_run_id) in links["Prefect flow run"]
    ]
    assert artifact.type == "markdown"
    assert f"[MLflow run]({links['MLflow run']})" in artifact.data
    assert "fused − CLM" in artifact.data and f"**{role}**" in artifact.data


def test_refusion_runs_only_when_inputs_changed(harness, fusion):
    from fusellm.stages.registry import read_record
    from fusellm_flows.refusion import refusion

    config, models, _ = fusion
    if read_record(config) is None:  # run alone: make the first fusion
        _run(config)
    before = _folders(config.workdir)
    result = refusion(config=config)
    assert result == {"changed": [], "fused": False}
    assert _folders(config.workdir) == before

    reseed_model(models["neox"], seed=9)  # a source changed: re-fuse, retrain only the fused model
    result = refusion(config=config)
    assert result["changed"] == ["source:neox"] and result["fused"] is True
    assert result["summary"]["computed"]["train"] == 1
    assert refusion(config=config)["changed"] == []


def test_refusion_needs_exactly_one_config(harness, fusion):
    from fusellm_flows.refusion import refusion

    config, _, _ = fusion
    with pytest.raises(ValueError, match="exactly one of config or config_path"):
        refusion(config=config, config_path="fusion.yaml")


def test_stage_flows_run_alone_from_the_cache(harness, fusion):
    """A stage deployed on its own reruns the stages before it as cache hits."""
    from fusellm.stages.registry import read_record
    from fusellm_flows import stages

    config, _, _ = fusion
    if read_record(config) is None:
        _run(config)
    before = _folders(config.workdir)
    out = stages.train(config)
    assert set(out["models"]) == {"fused", "baseline"}
    assert all(Path(m, "config.json").is_file() for m in out["models"].values())
    steps = {"resolve-sources", "fetch-model"}  # checks that always run; no stage folder
    states = {k: set(v) for k, v in out["states"].items() if k not in steps}
    assert states and all(v == {"Cached"} for v in states.values()), out["states"]
    assert _folders(config.workdir) == before


def test_pairwise_stage_flows_return_each_pair(harness, fusion):
    """`align-fuse` and `train` as flows of their own (what `execution: deployments` runs) in
    pairwise mode: a fused store per pair, a model per pair, the fused one."""
    from fusellm_flows import stages

    config, _, _ = fusion
    pairwise = config.model_copy(
        update={"fusion": config.fusion.model_copy(update={"mode": "pairwise"})}
    )
    fused = stages.align_fuse(pairwise)
    assert set(fused["pairs"]) == {"neox"}  # the target (llama) is no pair of its own
    assert Path(fused["pairs"]["neox"], "store").is_dir()
    out = stages.train(pairwise)
    assert set(out["models"]) == {"pair-neox", "baseline", "fused"}
    assert out["models"]["fused"] == out["models"]["pair-neox"]  # one pair: nothing to merge
    assert Path(out["models"]["fused"], "config.json").is_file()


def test_run_command_runs_the_flow(harness, fusion, tmp_path, monkeypatch):
    """`fusellm run CONFIG` reads the YAML, applies the embedded defaults and runs `fuse`."""
    import yaml
    from typer.testing import CliRunner

    from fusellm.settings import embedded_defaults
    from fusellm_flows.cli import app

    config, _, _ = fusion
    for name in embedded_defaults(tmp_path / "home"):  # restored after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))
        monkeypatch.delenv(name)
    path = tmp_path / "fusion.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["run", str(path), "--home", str(tmp_path / "home")])
    assert result.exit_code == 0, result.output
    assert '"fused_model"' in result.output and '"scores"' in result.output
    assert "MLflow run" in result.output and "/runs/flow-run/" in result.output  # the links
    assert (tmp_path / "home" / "prefect").is_dir()


def test_run_command_failure_is_one_red_line_with_a_log(harness, fusion, tmp_path, monkeypatch):
    """A failure inside the flow: exit 1, one line naming the stage, the task and the path,
    what to do next, and the traceback in the log file it names (not on the console)."""
    import re

    import yaml
    from typer.testing import CliRunner

    from fusellm.settings import embedded_defaults
    from fusellm_flows.cli import app

    config, _, _ = fusion
    for name in embedded_defaults(tmp_path / "home"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
        monkeypatch.delenv(name)
    data = config.model_dump(mode="json")
    missing = tmp_path / "no-such-model"
    data["sources"][1]["uri"] = str(missing)
    path = tmp_path / "fusion.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(path), "--home", str(tmp_path / "home")])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    line = errors[0]
    assert "stage prepare" in line and "resolve-sources" in line and str(missing) in line
    assert "Traceback" not in result.output
    log = Path(re.search(r"full log: (\S+\.log)", line).group(1))
    assert "Traceback" in log.read_text() and "MissingLocalPath" in log.read_text()
    assert "Retry 1/" not in result.output + log.read_text()  # a missing path: no retries


def test_prefect_task_runs_share_one_unit_pool(harness, tmp_path):
    """CPU-bound units as Prefect tasks: at most `workers` at once, this process one of them."""
    from prefect import flow
    from test_unit_pool import _most_at_once, _units

    from fusellm_tasks.stages import PrefectExecutor

    units = _units(tmp_path, 6, seconds=0.3)

    @flow
    def probe():
        ex = PrefectExecutor()
        return ex.run_all(units, workers=2), ex.tally.states

    artifacts, states = probe()
    infos = [a.info for a in artifacts]
    assert [a.key for a in artifacts] == [u.key for u in units]
    assert states["probe"] == ["Completed"] * 6
    assert _most_at_once(infos) <= 2
    assert len({i["pid"] for i in infos}) == 2 and os.getpid() in {i["pid"] for i in infos}
