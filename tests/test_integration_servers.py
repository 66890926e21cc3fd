"""The fusion against real servers on 127.0.0.1: `prefect server start`, `mlflow server` (SQLite
backend, artifacts in S3) and moto's standalone S3 server.

The sources and the corpus are uploaded to S3 and fused from there; MLflow's artifacts (the
fused model included) land in S3; the fused model is registered with its alias. Then every
deployment of infra/prefect.yaml is deployed with `prefect deploy`, and the `refusion`
deployment is run by a `process` worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml
from fusion_fixtures import build_models, champion_texts, fusion_dict, write_corpus
from s3server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from support import free_port, start_server, stop_server, wait_http

from fusellm.settings import LOCALHOST, TELEMETRY_OFF

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    return start_server(argv, log, env, cwd=REPO)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (what Prefect's server and worker and MLflow treat as a clean stop), then kill."""
    stop_server(proc, signal.SIGINT, grace_s=20)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, s3_endpoint):
    root = tmp_path_factory.mktemp("servers")
    bucket = "fusellm-it"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_url = f"http://{LOCALHOST}:{prefect_port}/api"
    prefect_env = {
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_API_HOST": LOCALHOST,
        "PREFECT_SERVER_API_PORT": str(prefect_port),
        "PREFECT_UI_API_URL": prefect_url,
        "PREFECT_API_URL": prefect_url,
    }
    prefect = _start(
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            LOCALHOST,
            "--port",
            str(prefect_port),
        ],
        prefect_env,
        root / "prefect.log",
    )
    mlflow = _start(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{bucket}/mlartifacts",
            "--serve-artifacts",
            "--host",
            LOCALHOST,
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ],
        {**MLFLOW_SERVER_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint},
        root / "mlflow.log",
    )
    try:
        mlflow_url = f"http://{LOCALHOST}:{mlflow_port}"
        wait_http(f"{prefect_url}/health", prefect, 180, root / "prefect.log", name="prefect")
        wait_http(f"{mlflow_url}/health", mlflow, 120, root / "mlflow.log", name="mlflow")
        yield {
            "root": root,
            "bucket": bucket,
            "prefect_env": prefect_env,
            "prefect_url": prefect_url,
            "mlflow_url": mlflow_url,
            "s3": s3_endpoint,
        }
    finally:
        _stop(mlflow)
        _stop(prefect)


@pytest.fixture(scope="module")
def s3_fusion(servers):
    """Tiny models and corpus uploaded to S3; the config names only s3:// URIs."""
    from fusellm.config import parse_fusion_config
    from fusellm.io.sources import upload_dir

    root, bucket = servers["root"], servers["bucket"]
    texts = champion_texts()
    for name, path in build_models(root / "local-models", texts).items():
        upload_dir(path, f"s3://{bucket}/models/{name}")
    upload_dir(write_corpus(root / "local-corpus", texts), f"s3://{bucket}/corpus")
    models = {n: f"s3://{bucket}/models/{n}" for n in ("llama", "neox")}
    data = fusion_dict(models, f"s3://{bucket}/corpus", root / "work", servers["mlflow_url"])
    data["target"] = {"uri": models["neox"]}  # the stronger source here, on these texts
    data["training"].update(max_steps=6, learning_rate=1e-2)
    data["tracking"]["registered_model"] = "it-fused"
    path = root / "fusion.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_fusion_config(data), path


def test_fusion_from_s3_tracked_in_mlflow_server(servers, s3_fusion):
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    config, _ = s3_fusion
    from fusellm_flows.fuse import fuse

    storage = servers["root"] / "prefect" / "storage"
    with temporary_settings(
        {PREFECT_API_URL: servers["prefect_url"], PREFECT_LOCAL_STORAGE_PATH: storage}
    ):
        summary = fuse(config)
    assert (config.workdir / "cache" / "s3").is_dir()  # sources really came from S3

    client = MlflowClient(servers["mlflow_url"])
    registration = summary["registration"]
    version = client.get_model_version("it-fused", str(registration["version"]))
    assert registration["is_champion"], (registration, summary["scores"])
    alias = client.get_model_version_by_alias("it-fused", "champion")
    assert alias.version == version.version
    assert version.tags["fusellm.role"] == "champion"
    # The model's files and the run's artifacts are in the S3 bucket behind the server.
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=servers["s3"]).list_objects_v2(
            Bucket=servers["bucket"], Prefix="mlartifacts/"
        )["Contents"]
    ]
    assert any(k.endswith("model.safetensors") for k in keys)
    assert any(k.endswith("comparison.png") for k in keys)
    assert any(k.endswith("summary.json") for k in keys)

    # The flow run is on the real server.
    from prefect.client.orchestration import get_client

    async def runs():
        async with get_client() as c:
            return await c.read_flow_runs()

    with temporary_settings({PREFECT_API_URL: servers["prefect_url"]}):
        names = {r.name: r.state_name for r in asyncio.run(runs())}
    assert "Completed" in names.values()


PLANTED_PASSWORD = "planted-mlflow-pw-5e3c1d"  # in the tracking URI of the environment
PLANTED_HF_TOKEN = "hf_PlantedToken0123456789abcdef"


def _prefect_records(url: str) -> list[tuple[str, str]]:
    """(where, text) of everything the Prefect server shows: flow-run parameters, logs."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as c:
            runs = await c.read_flow_runs()
            logs = await c.read_logs()
            task_runs = await c.read_task_runs()
        return (
            [(f"flow run {r.name} parameters", json.dumps(r.parameters, default=str)) for r in runs]
            + [(f"flow run {r.name} state", str(r.state)) for r in runs]
            + [(f"task run {t.name}", t.model_dump_json()) for t in task_runs]
            + [("Prefect log", entry.message) for entry in logs]
        )

    with temporary_settings({PREFECT_API_URL: url}):
        return asyncio.run(read())


def _mlflow_records(url: str, dst: Path) -> list[tuple[str, str]]:
    """(where, text) of everything the MLflow server holds: params, tags, notes, model versions,
    and every artifact (downloaded from the S3 store behind it)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(url)
    found = []
    experiments = client.search_experiments()
    for run in client.search_runs([e.experiment_id for e in experiments]):
        found += [(f"run {run.info.run_id} params", json.dumps(run.data.params))]
        found += [(f"run {run.info.run_id} tags", json.dumps(run.data.tags))]
        folder = dst / run.info.run_id
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(folder), tracking_uri=url
        )
        found += [
            (f"artifact {p.relative_to(dst)}", p.read_bytes().decode("latin-1"))
            for p in folder.rglob("*")
            if p.is_file()
        ]
    for version in client.search_model_versions():
        found += [(f"model version {version.name}/{version.version}", str(dict(version)))]
    return found


def test_planted_secrets_surface_nowhere(servers, s3_fusion, monkeypatch, capfd):
    """An S3 secret key, a tracking-server password (in MLFLOW_TRACKING_URI) and a Hub token in
    the environment of a fusion, and of a fusion that fails: none of them appears in the output,
    the Prefect server (parameters the UI shows, task runs, logs), MLflow (params, tags, notes,
    model versions, artifacts) or the error message."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from s3server import DUMMY_ENV

    from fusellm_flows.fuse import fuse

    config, _ = s3_fusion
    host = servers["mlflow_url"].split("://", 1)[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://fusellm:{PLANTED_PASSWORD}@{host}")
    monkeypatch.setenv("HF_TOKEN", PLANTED_HF_TOKEN)
    tracking = config.tracking.model_copy(update={"tracking_uri": None, "registered_model": "it-x"})
    config = config.model_copy(update={"tracking": tracking, "name": "secret-sweep"})
    broken = config.model_copy(
        update={"corpus": config.corpus.model_copy(update={"uri": "s3://fusellm-it/missing"})}
    )
    storage = servers["root"] / "prefect" / "storage"
    with temporary_settings(
        {PREFECT_API_URL: servers["prefect_url"], PREFECT_LOCAL_STORAGE_PATH: storage}
    ):
        assert fuse(config)["registration"]["name"] == "it-x"
        with pytest.raises(Exception) as failed:
            fuse(broken)
    assert "missing" in str(failed.value)  # the failure it was meant to be

    out, err = capfd.readouterr()
    records = [("stdout", out), ("stderr", err), ("error", f"{failed.value!r} {failed.value}")]
    records += _prefect_records(servers["prefect_url"])
    records += _mlflow_records(servers["mlflow_url"], servers["root"] / "sweep")
    records += [
        (f"Prefect result {p.name}", p.read_bytes().decode("latin-1"))
        for p in storage.rglob("*")
        if p.is_file()
    ]
    secrets = [PLANTED_PASSWORD, PLANTED_HF_TOKEN, DUMMY_ENV["AWS_SECRET_ACCESS_KEY"]]
    leaks = [
        (where, text[max(0, text.index(s) - 200) : text.index(s) + 50])
        for where, text in records
        for s in secrets
        if s in text
    ]
    assert leaks == []
    assert len(records) > 50  # the sweep read what there was to read
    assert any("secret-sweep" in text for where, text in records if "parameters" in where)


async def _deployment_and_logs(flow_run_id, expected: str, timeout: float = 60.0):
    """The deployment, and the flow run's log lines once `expected` arrived (logs are shipped
    in batches, so they may trail the final state by a few seconds)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        deployment = await client.read_deployment_by_name("refusion/refusion")
        deployments = await client.read_deployments()
        deadline = time.monotonic() + timeout
        while True:
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            messages = [entry.message for entry in logs]
            if any(expected in m for m in messages) or time.monotonic() > deadline:
                return deployment, deployments, messages
            await asyncio.sleep(1.0)


@pytest.fixture(scope="module")
def deployed(servers, s3_fusion):
    """Every deployment of infra/prefect.yaml deployed with `prefect deploy`, and a `process`
    worker on each pool (the GPU stages' pool: any type will do here)."""
    _, config_path = s3_fusion
    root = servers["root"]
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        **servers["prefect_env"],
        "FUSELLM_PROJECT_DIR": str(REPO),
        "FUSELLM_CONFIG": str(config_path),
        "FUSELLM_HOME": str(root / "worker-home"),
        "MLFLOW_TRACKING_URI": servers["mlflow_url"],
    }
    cli = str(BIN / "prefect")
    # The pools as `fusellm pools` makes them (the compose stack's are Docker pools).
    created = subprocess.run(
        [str(BIN / "fusellm"), "pools", "--type", "process", "--job-env", "FUSELLM_HOME"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    assert "work pool fusellm-gpu (process): created" in created.stdout
    deploy = subprocess.run(
        [cli, "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    workers = [
        _start([cli, "worker", "start", "--pool", pool], env, root / f"worker-{pool}.log")
        for pool in ("fusellm-cpu", "fusellm-gpu")
    ]
    try:
        yield root
    finally:
        for worker in workers:
            _stop(worker)


def test_refusion_deployed_and_run_by_a_process_worker(servers, deployed):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = deployed
    with temporary_settings({PREFECT_API_URL: servers["prefect_url"]}):
        run = run_deployment("refusion/refusion", timeout=400)
        deployment, deployments, messages = asyncio.run(
            _deployment_and_logs(run.id, "nothing to do")
        )
    assert {d.name for d in deployments} == {
        "fuse",
        "refusion",
        "prepare",
        "extract",
        "align-fuse",
        "train",
    }
    assert {d.name: d.work_pool_name for d in deployments}["train"] == "fusellm-gpu"
    worker_log = (root / "worker-fusellm-cpu.log").read_text()[-3000:]
    assert run.state.is_completed(), (run.state, worker_log)
    assert deployment.parameters.get("config_path") is None  # read where it runs: the worker's
    # FUSELLM_CONFIG names the S3 fusion, whose last run is recorded: "nothing to do" below
    assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * 1"
    assert any("nothing to do" in m for m in messages), messages


def test_execution_deployments_runs_each_stage_on_its_pool(servers, s3_fusion, deployed):
    """`execution: deployments`: `fuse` runs prepare, extract, align-fuse and train as runs of
    their deployments, picked up by the workers of their pools (extract and train: the GPU
    pool), as children of its own run; it then finds them done and evaluates and registers."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from fusellm_flows.fuse import fuse

    config, _ = s3_fusion
    config = config.model_copy(
        update={"execution": "deployments", "name": "dispatched", "workdir": deployed / "dwork"}
    )
    storage = servers["root"] / "prefect" / "storage"
    with temporary_settings(
        {PREFECT_API_URL: servers["prefect_url"], PREFECT_LOCAL_STORAGE_PATH: storage}
    ):
        summary = fuse(config)

        async def runs():
            async with get_client() as c:
                deployments = {d.id: d.name for d in await c.read_deployments()}
                return [(deployments.get(r.deployment_id), r) for r in await c.read_flow_runs()]

        flow_runs = asyncio.run(runs())
    dispatched = {
        name: run
        for name, run in flow_runs
        if name in ("prepare", "extract", "align-fuse", "train")
        and run.parameters.get("config", {}).get("name") == "dispatched"
    }
    assert set(dispatched) == {"prepare", "extract", "align-fuse", "train"}
    assert all(run.state.is_completed() for run in dispatched.values())
    assert {n: r.work_pool_name for n, r in dispatched.items()} == {
        "prepare": "fusellm-cpu",
        "extract": "fusellm-gpu",
        "align-fuse": "fusellm-cpu",
        "train": "fusellm-gpu",
    }
    assert all(run.parent_task_run_id for run in dispatched.values())  # children of fuse
    states = summary["states"]  # fuse itself found every stage up to training done
    for stage in ("pieces", "extract", "fuse", "train"):
        assert set(states[stage]) == {"Cached"}, (stage, states[stage])
    assert "Completed" in states["register"]
    assert (deployed / "dwork" / "train").is_dir()
