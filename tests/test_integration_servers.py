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
import threading
import time
from collections import Counter
from pathlib import Path

import boto3
import psutil
import pytest
import yaml
from fusion_fixtures import build_models, champion_texts, fusion_dict, write_corpus
from s3server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from support import (
    LAUNCHER_VARIABLES,
    folder_bytes,
    free_port,
    start_server,
    stop_server,
    wait_http,
)

from fusellm.settings import LOCALHOST, TELEMETRY_OFF

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
GPU_WORKERS = 3


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A server or worker without what an in-process training leaves in this process's
    environment (a one-process group): a worker must not hand it to its flow runs, which would
    take themselves for ranks of a group (lm-eval's Accelerator joins it; parts collide on its
    port)."""
    env = {k: v for k, v in env.items() if k not in LAUNCHER_VARIABLES}
    return start_server(argv, log, env, cwd=REPO, unset=LAUNCHER_VARIABLES)


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
    # 60 pieces: 6 shards of each model, extracted in parts of 2 shards with `deployments`
    data["extraction"].update(shard_size=10, shards_per_part=2)
    data["tracking"]["registered_model"] = "it-fused"
    path = root / "fusion.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_fusion_config(data), path


def _fuse_on(servers, config) -> dict:
    """`fuse(config)` in this process, on the test's Prefect server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from fusellm_flows.fuse import fuse

    storage = servers["root"] / "prefect" / "storage"
    with temporary_settings(
        {PREFECT_API_URL: servers["prefect_url"], PREFECT_LOCAL_STORAGE_PATH: storage}
    ):
        return fuse(config)


@pytest.fixture(scope="module")
def in_process(servers, s3_fusion):
    """The S3 fusion run in process (`execution: in-process`): its summary."""
    return _fuse_on(servers, s3_fusion[0])


def test_fusion_from_s3_tracked_in_mlflow_server(servers, s3_fusion, in_process):
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config, summary = s3_fusion[0], in_process
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
        [str(BIN / "fusellm"), "pools", "--type", "process", "--job-env", "FUSELLM_HOME",
         "--gpu-concurrency", str(GPU_WORKERS)],  # one run at a time per GPU "machine"
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    assert "work pool fusellm-gpu (process): created" in created.stdout
    deploy = subprocess.run(
        [cli, "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "automation 'fusellm: mark runs crashed when their heartbeats stop'" in created.stdout
    workers = {
        "cpu": _start(
            [cli, "worker", "start", "--pool", "fusellm-cpu"], env, root / "worker-cpu.log"
        )
    }
    for i in range(GPU_WORKERS):  # one run at a time each, as on a GPU machine
        argv = [
            cli,
            "worker",
            "start",
            "--pool",
            "fusellm-gpu",
            "--limit",
            "1",
            "--name",
            f"gpu-{i}",
        ]
        workers[f"gpu-{i}"] = _start(argv, env, root / f"worker-gpu-{i}.log")
    try:
        yield {"root": root, "workers": workers}
    finally:
        for worker in workers.values():
            _stop(worker)


def test_refusion_deployed_and_run_by_a_process_worker(servers, in_process, deployed):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = deployed["root"]
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
        "extract-part",
        "train-part",
        "evaluate-part",
        "train-node",
    }
    pools = {d.name: d.work_pool_name for d in deployments}
    assert {n for n, p in pools.items() if p == "fusellm-gpu"} == {
        "extract", "train", "extract-part", "train-part", "evaluate-part", "train-node"
    }  # fmt: skip
    worker_log = (root / "worker-cpu.log").read_text()[-3000:]
    assert run.state.is_completed(), (run.state, worker_log)
    assert deployment.parameters.get("config_path") is None  # read where it runs: the worker's
    # FUSELLM_CONFIG names the S3 fusion, whose last run is recorded: "nothing to do" below
    assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * 1"
    assert any("nothing to do" in m for m in messages), messages


# ---------------------------------------------------------------------------------------------
# execution: deployments, fanned out over three GPU workers, one of them killed


def _flow_runs(servers) -> list[tuple[str | None, object]]:
    """(deployment name, flow run) of every flow run on the server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as c:
            deployments = {d.id: d.name for d in await c.read_deployments()}
            return [(deployments.get(r.deployment_id), r) for r in await c.read_flow_runs()]

    with temporary_settings({PREFECT_API_URL: servers["prefect_url"]}):
        return asyncio.run(read())


def _task_runs(servers, flow_run_ids: list) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as c:
            runs = FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids))
            return await c.read_task_runs(flow_run_filter=runs)

    with temporary_settings({PREFECT_API_URL: servers["prefect_url"]}):
        return asyncio.run(read())


class PartKiller(threading.Thread):
    """SIGKILLs one GPU worker, process tree and all (a machine lost), while it runs an
    `extract-part` of the named fusion: once the part's run has been Running for a few
    seconds, so that its first heartbeat reached the server."""

    def __init__(self, servers, workers: dict, fusion: str, running_s: float = 3.0):
        super().__init__(daemon=True)
        self.servers, self.workers, self.fusion, self.running_s = (
            servers,
            workers,
            fusion,
            running_s,
        )
        self.killed: tuple[str, str] | None = None  # (worker, flow run id)
        self.stop = threading.Event()

    def _owner(self, run_id: str) -> str | None:
        """The GPU worker whose process tree runs flow run `run_id`."""
        for name, worker in self.workers.items():
            if not name.startswith("gpu"):
                continue
            for child in psutil.Process(worker.pid).children(recursive=True):
                try:
                    if child.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                        return name
                except psutil.Error:
                    continue
        return None

    def _kill(self, name: str) -> None:
        worker = psutil.Process(self.workers[name].pid)
        for proc in [worker, *worker.children(recursive=True)]:
            try:
                proc.kill()
            except psutil.Error:
                pass

    def run(self) -> None:
        from datetime import datetime, timezone

        while not self.stop.is_set() and self.killed is None:
            for name, run in _flow_runs(self.servers):
                if name != "extract-part" or run.parameters["config"]["name"] != self.fusion:
                    continue
                state = run.state
                if state is None or not state.is_running():
                    continue
                age = (datetime.now(timezone.utc) - state.timestamp).total_seconds()
                owner = self._owner(str(run.id)) if age >= self.running_s else None
                if owner:
                    self._kill(owner)
                    self.killed = (owner, str(run.id))
                    break
            time.sleep(0.5)


def _worker_of(root: Path, run_id: str) -> str:
    """Which GPU worker's log names the flow run (the worker that ran it)."""
    found = [
        f"gpu-{i}"
        for i in range(GPU_WORKERS)
        if run_id in (root / f"worker-gpu-{i}.log").read_text(errors="replace")
    ]
    assert len(found) == 1, (run_id, found)
    return found[0]


def test_execution_deployments_fans_parts_out_over_the_gpu_workers(
    servers, s3_fusion, in_process, deployed
):
    """`execution: deployments`: extraction of 2 models x 6 shards as 6 parts spread over the
    GPU workers, the two trainings as parts side by side; one worker SIGKILLed in the middle of a part: its run ends Crashed (no more
    heartbeats), the part runs again on another worker, and the fusion completes with stores
    byte-identical to the in-process run's, every unit built once; evaluation runs on the GPU
    pool as (model, suite) parts, children of `fuse`, with the in-process scores."""
    root = deployed["root"]
    config = s3_fusion[0].model_copy(
        update={"execution": "deployments", "name": "dispatched", "workdir": root / "dwork"}
    )
    killer = PartKiller(servers, deployed["workers"], "dispatched")
    killer.start()
    try:
        summary = _fuse_on(servers, config)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no extract-part was seen running long enough to kill"
    killed_worker, killed_run = killer.killed

    mine = [  # the runs of deployments `fuse` started (fuse itself ran in this process)
        (name, run)
        for name, run in _flow_runs(servers)
        if name and run.parameters.get("config", {}).get("name") == "dispatched"
    ]
    fuse_id = summary["links"]["Prefect flow run"].rsplit("/", 1)[1]
    pools = {name: run.work_pool_name for name, run in mine}
    assert pools == {
        "prepare": "fusellm-cpu",
        "extract-part": "fusellm-gpu",
        "align-fuse": "fusellm-cpu",
        "train-part": "fusellm-gpu",
        "evaluate-part": "fusellm-gpu",
    }
    trainings = sorted(r.parameters["model"] for name, r in mine if name == "train-part")
    assert trainings == ["baseline", "fused"]  # side by side, one worker each
    assert all(run.parent_task_run_id for _, run in mine)  # children of fuse
    parents = {t.flow_run_id for t in _task_runs(servers, [fuse_id])}
    assert {str(p) for p in parents} == {fuse_id}

    parts = [run for name, run in mine if name == "extract-part"]
    by_part: dict[tuple, list] = {}
    for run in sorted(parts, key=lambda r: r.created):
        key = (run.parameters["model"], tuple(run.parameters["shards"]))
        by_part.setdefault(key, []).append(run)
    assert len(by_part) == 6  # 2 models x 6 shards, 2 shards a part
    lost = [runs for runs in by_part.values() if any(str(r.id) == killed_run for r in runs)]
    assert len(lost) == 1
    assert [r.state.name for r in lost[0]] == ["Crashed", "Completed"], lost  # and its re-run
    assert "heartbeat" in lost[0][0].state.message
    others = [runs for runs in by_part.values() if runs is not lost[0]]
    assert all([r.state.name for r in runs] == ["Completed"] for runs in others)
    completed = [r for runs in by_part.values() for r in runs if r.state.is_completed()]
    workers = {_worker_of(root, str(r.id)) for r in completed}
    assert len(workers | {killed_worker}) >= 2, workers  # spread over the pool
    assert _worker_of(root, str(lost[0][1].id)) != killed_worker  # taken by a live worker

    # Every extraction unit built once (the lost run's last unit may have gone unreported).
    tasks = _task_runs(servers, [r.id for r in parts])
    computed = Counter(
        t.name for t in tasks if t.name.startswith("extract-") and t.state_name == "Completed"
    )
    assert set(computed.values()) == {1}, computed  # nothing computed twice
    assert len(computed) >= 12 - 2, computed  # the lost run may not have reported its units
    assert summary["states"]["extract"] == ["Cached"] * 12  # fuse found every unit done
    assert summary["states"]["evaluate"] == ["Cached"] * 4

    # The stores equal the in-process run's, byte for byte.
    mine_stores = sorted((root / "dwork" / "store").glob("[!.]*/store"))
    theirs = {p.parent.name: p for p in (s3_fusion[0].workdir / "store").glob("[!.]*/store")}
    assert len(mine_stores) == 2
    for store in mine_stores:
        assert folder_bytes(store) == folder_bytes(theirs[store.parent.name]), store

    evaluations = [run for name, run in mine if name == "evaluate-part"]
    assert sorted((r.parameters["model"], r.parameters["suite"]) for r in evaluations) == [
        ("baseline", "local"), ("fused", "local"), ("llama", "local"), ("neox", "local")
    ]  # fmt: skip
    assert all(r.state.is_completed() for r in evaluations)
    assert summary["scores"] == in_process["scores"]
