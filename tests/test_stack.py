"""The compose stack of infra/, for real: images built here, every stage in a container.

A Docker daemon of the tests' own (tests/containers.py) builds the base, the fusellm CPU image
and the stack's Postgres and S3 images, and brings up infra/compose.yaml with its CI override.
Then:
1. the tiny fusion with `execution: deployments` runs as a `fuse` flow run in a container on
   the Docker pool fusellm-cpu, which runs each stage as a run of its deployment, each in a
   container of its own (train, and extraction and evaluation in parts, on fusellm-gpu); the
   fused model is registered in
   MLflow (its database in Postgres) with its files in the S3 store;
2. the GPU pool holds its concurrency limit: stage runs submitted at once run one at a time;
3. in Chromium, the `fuse` deployment is run from the Prefect UI's form and completes, and the
   registered model and its `champion` alias show in the MLflow UI (screenshots kept);
4. the stack goes down and comes back up, and the runs, the model and its files are all there.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from importlib.metadata import version
from itertools import pairwise
from pathlib import Path

import pytest
from browser import browser, page  # noqa: F401  (fixtures)
from containers import (
    Stack,
    build_context,
    docker_daemon,
    ensure_base_image,
    stack_settings,
    write_env,
)
from fusion_fixtures import EVAL_DATA, build_models, champion_texts, fusion_dict, write_corpus
from support import api_json

pytestmark = [pytest.mark.slow, pytest.mark.containers, pytest.mark.timeout(3600)]

STAGES = ("prepare", "align-fuse")  # training: train-part runs (joint: no merge to do)
PARTS = ("extract-part", "train-part", "evaluate-part")  # fanned out over the GPU pool
WORK = "/data/fusellm"  # the shared work volume, in every container
MODEL = "stack-fused"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("stack")
    started = time.monotonic()
    with docker_daemon(scratch) as daemon:
        ensure_base_image(daemon, scratch)
        settings = {
            **stack_settings("fusellm-ci"),
            "FUSELLM_BUILD_CONTEXT": str(build_context(scratch / "context")),
            "DOCKER_SOCKET": str(daemon.socket),
        }
        stack = Stack(daemon, write_env(scratch / "stack.env", settings), settings)
        stack.compose("build", timeout=1800)
        TIMINGS["images"] = time.monotonic() - started
        try:
            stack.up()
            TIMINGS["stack up"] = time.monotonic() - started - TIMINGS["images"]
            yield stack
        finally:
            stack.compose("down", "--volumes", "--timeout", "30", check=False)
            print(f"\ncontainer test timings (s): { {k: round(v) for k, v in TIMINGS.items()} }")


@pytest.fixture(scope="module")
def fusion_config(stack, tmp_path_factory, monkeypatch_module):
    """The tiny fusion's models and corpus in the stack's S3 store, the evaluation data in the
    work volume; the config as the `fuse` deployment's parameter."""
    from fusellm.io.sources import upload_dir

    root = tmp_path_factory.mktemp("stack-inputs")
    monkeypatch_module.setenv("FUSELLM_S3_ENDPOINT_URL", stack.s3_url)
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", stack.settings["S3_ACCESS_KEY"])
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", stack.settings["S3_SECRET_KEY"])
    texts = champion_texts()
    for name, path in build_models(root / "models", texts).items():
        upload_dir(path, f"s3://fusellm/models/{name}")
    upload_dir(write_corpus(root / "corpus", texts), "s3://fusellm/corpus")
    volume = stack.settings["FUSELLM_WORK_VOLUME"]
    stack.daemon.docker(
        "run", "--rm", "--network", "none", "--user", "10001",
        "-v", f"{volume}:{WORK}", "-v", f"{EVAL_DATA}:/eval:ro",
        "--entrypoint", "cp", "fusellm:cpu", "-r", "/eval", f"{WORK}/eval",
    )  # fmt: skip
    models = {n: f"s3://fusellm/models/{n}" for n in ("llama", "neox")}
    # The stage containers reach MLflow by its name on the stack's network.
    data = fusion_dict(models, "s3://fusellm/corpus", Path(f"{WORK}/work"), "http://mlflow:5000")
    data["name"] = "stack-fusion"
    data["target"] = {"uri": models["neox"]}
    data["training"].update(max_steps=6, learning_rate=1e-2)
    data["extraction"]["shards_per_part"] = 8  # one part a model: a container each
    data["evaluation"]["data_dir"] = f"{WORK}/eval"
    data["tracking"]["registered_model"] = MODEL
    data["execution"] = "deployments"
    return data


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _prefect(stack: Stack, coroutine_fn):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def call():
        async with get_client() as client:
            return await coroutine_fn(client)

    with temporary_settings({PREFECT_API_URL: stack.prefect_api}):
        return asyncio.run(call())


def _runs_by_deployment(stack: Stack) -> list[tuple[str | None, object]]:
    async def read(client):
        deployments = {d.id: d.name for d in await client.read_deployments()}
        return [(deployments.get(r.deployment_id), r) for r in await client.read_flow_runs()]

    return _prefect(stack, read)


def _container_id(run) -> str:
    """The Docker worker records `<daemon>:<container id>` as the run's infrastructure."""
    return (run.infrastructure_pid or "").rsplit(":", 1)[-1]


def test_fusion_runs_stage_by_stage_in_containers(stack, fusion_config):
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: stack.prefect_api}):
        run = run_deployment("fuse/fuse", parameters={"config": fusion_config}, timeout=1800)
    TIMINGS["fusion"] = time.monotonic() - started
    assert run.state.is_completed(), (run.state, stack.logs("worker-cpu", "worker-gpu"))

    runs = _runs_by_deployment(stack)
    fuse = [r for name, r in runs if name == "fuse"]
    stages = {name: r for name, r in runs if name in STAGES}
    parts = [(name, r) for name, r in runs if name in PARTS]
    assert set(stages) == set(STAGES) and len(fuse) == 1
    assert {name for name, _ in parts} == set(PARTS)
    assert {n: r.work_pool_name for n, r in stages.items()} == {
        "prepare": "fusellm-cpu",
        "align-fuse": "fusellm-cpu",
    }
    assert {r.work_pool_name for _, r in parts} == {"fusellm-gpu"}
    children = [*stages.values(), *(r for _, r in parts)]
    assert all(r.state.is_completed() and r.parent_task_run_id for r in children)
    containers = {_container_id(r) for r in [*fuse, *children]}
    assert len(containers) == 1 + len(children) and all(len(c) == 64 for c in containers)

    client = MlflowClient(stack.mlflow_url)
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1
    assert client.get_model_version_by_alias(MODEL, "champion").version == versions[0].version
    # MLflow's records are in Postgres, the model's files in the S3 store.
    rows = stack.compose(
        "exec", "-T", "postgres", "psql", "-U", "fusellm", "-d", "mlflow", "-tA", "-c",
        "select name from registered_models",
    ).stdout.split()  # fmt: skip
    assert MODEL in rows
    keys = _artifact_keys(stack)
    assert any(k.endswith("model.safetensors") for k in keys), keys[:20]


def _artifact_keys(stack: Stack) -> list[str]:
    pages = stack.s3().get_paginator("list_objects_v2").paginate(Bucket="mlflow")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_gpu_pool_runs_one_stage_at_a_time(stack, fusion_config):
    """Two extraction runs submitted at once (their work is done: each only checks) run one
    after the other: the limits `fusellm pools` and compose.yaml configure (the pool's
    concurrency limit, 1 here, and the GPU worker's `--limit 1`) hold."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    pool = _prefect(stack, lambda c: c.read_work_pool("fusellm-gpu"))
    assert pool.type == "docker" and pool.concurrency_limit == 1
    with temporary_settings({PREFECT_API_URL: stack.prefect_api}):
        submitted = [
            run_deployment("extract/extract", parameters={"config": fusion_config}, timeout=0)
            for _ in range(2)
        ]
    ids = [r.id for r in submitted]
    deadline = time.monotonic() + 900
    while True:
        runs = _prefect(stack, lambda c: asyncio.gather(*(c.read_flow_run(i) for i in ids)))
        if all(r.state.is_final() for r in runs):
            break
        assert time.monotonic() < deadline, [r.state.name for r in runs]
        time.sleep(3)
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert all(earlier[1] <= later[0] for earlier, later in pairwise(spans)), spans


def test_stack_restart_keeps_runs_model_and_artifacts(stack, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    # Runs that ended (scheduled `refusion` runs are the scheduler's to re-make at will).
    before = {r.id: r.state.type for _, r in _runs_by_deployment(stack) if r.state.is_final()}
    assert len(before) >= 5
    keys = _artifact_keys(stack)
    weights = next(k for k in keys if k.endswith("model.safetensors"))
    etag = stack.s3().head_object(Bucket="mlflow", Key=weights)["ETag"]

    started = time.monotonic()
    stack.compose("down", "--timeout", "30")
    assert not stack.container("postgres")
    stack.up()
    TIMINGS["restart"] = time.monotonic() - started

    after = {r.id: r.state.type for _, r in _runs_by_deployment(stack)}
    assert {i: after.get(i) for i in before} == before
    client = MlflowClient(stack.mlflow_url)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.status == "READY"
    assert _artifact_keys(stack) == keys
    assert stack.s3().head_object(Bucket="mlflow", Key=weights)["ETag"] == etag
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)  # models:/ resolves there
    # Through the server: its presigned URLs name the store as the stack's network knows it.
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    files = download_artifacts(artifact_uri=f"models:/{MODEL}@champion", dst_path=str(tmp_path))
    assert list(Path(files).rglob("model.safetensors")), sorted(Path(files).rglob("*"))


def test_cuda_image_builds_up_to_its_cuda_checks(stack):
    """The CUDA image's `app` stage on the Debian base (CPU torch from the wheels folder): all
    but the checks that need the CUDA toolkit, which run on the CUDA base only. Its imports
    and CLI are checked at build time; here it also runs, as user 10001, with no network."""
    started = time.monotonic()
    context = stack.settings["FUSELLM_BUILD_CONTEXT"]
    stack.daemon.docker(
        "build", "--network", "host", "--target", "app", "-f", f"{context}/docker/Dockerfile.cuda",
        "--build-arg", f"BASE={stack.settings['FUSELLM_BASE_IMAGE']}",
        "--build-arg", "TORCH_INDEX=https://pypi.org/simple", "-t", "fusellm:cuda-app", context,
        timeout=1800,
    )  # fmt: skip
    TIMINGS["cuda image (app stage)"] = time.monotonic() - started
    ran = stack.daemon.docker("run", "--rm", "--network", "none", "fusellm:cuda-app", "version")
    assert ran.stdout.strip() == version("fusellm"), ran.stdout
    user = stack.daemon.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "id", "fusellm:cuda-app", "-u"
    )
    assert user.stdout.strip() == "10001"


def _fuse_runs(stack: Stack) -> list[dict]:
    """The `fuse` deployment's flow runs, from the REST API."""
    body = {"deployments": {"name": {"any_": ["fuse"]}}}
    return api_json(f"{stack.prefect_api}/flow_runs/filter", body)


# Last in the module: Playwright's sync API holds an event loop in this thread until the module
# ends, so nothing after it may call asyncio (the Prefect client); it uses the REST API.
def test_fuse_run_from_the_prefect_ui_form_and_champion_in_the_mlflow_ui(
    stack, fusion_config, page, tmp_path
):
    from playwright.sync_api import expect

    shots = Path(os.environ.get("FUSELLM_UI_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {shots}")
    prefect = stack.prefect_api.removesuffix("/api")
    config = {**fusion_config, "name": "stack-ui"}
    earlier = {r["id"] for r in _fuse_runs(stack)}
    started = time.monotonic()

    # The `fuse` deployment -> Run -> Custom run -> its form, given as JSON -> Submit.
    page.goto(f"{prefect}/deployments")
    page.get_by_role("link", name="fuse", exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    expect(page.get_by_text("Fusion name (Optional)").first).to_be_visible()  # the typed form
    page.screenshot(path=str(shots / "1-fuse-form.png"))
    page.locator("xpath=//*[normalize-space(text())='Parameters']/following::button[1]").click()
    page.get_by_text("Use JSON input", exact=True).click()
    page.locator("textarea").first.fill(json.dumps({"config": config}, indent=2))
    page.screenshot(path=str(shots / "2-fuse-form-json.png"))
    page.get_by_role("button", name="Submit", exact=True).click()

    deadline = time.monotonic() + 1200
    while True:
        runs = [r for r in _fuse_runs(stack) if r["id"] not in earlier]
        assert len(runs) <= 1, "one Submit, one flow run"
        if runs and runs[0]["state_type"] in FINAL:
            break
        assert time.monotonic() < deadline, runs and runs[0]["state_type"]
        time.sleep(5)
    TIMINGS["run from the UI"] = time.monotonic() - started
    assert runs[0]["state_type"] == "COMPLETED", (runs[0]["state"], stack.logs("worker-cpu"))
    page.goto(f"{prefect}/runs/flow-run/{runs[0]['id']}")
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
    page.screenshot(path=str(shots / "3-fuse-run-completed.png"))

    # The registered model and its alias in the MLflow UI.
    page.goto(f"{stack.mlflow_url}/#/models/{MODEL}")
    version = page.get_by_role("row").filter(has_text="Version 1")
    expect(version.get_by_text(re.compile(r"^@\s*champion$")).first).to_be_visible()  # its alias
    page.screenshot(path=str(shots / "4-mlflow-model-champion.png"))
