"""The compose stack of infra/, for real: images built here, every stage in a container.

A Docker daemon of the tests' own (tests/containers.py) builds the base, the fusellm CPU image
and the stack's Postgres and S3 images, and brings up infra/compose.yaml with its CI override.
Then:
1. the GPU pool holds its concurrency limit: stage runs submitted at once run one at a time;
2. the CUDA image's app stage builds and runs;
3. in Chromium, a chat fusion (FuseChat: conversations, one pairwise fusion per source, then a
   merge) with `execution: deployments` is run from the `fuse` deployment's form in the
   Prefect UI. It runs as a `fuse` flow run in a container on the Docker pool fusellm-cpu,
   which runs each stage as a run of its deployment, each in a container of its own: the
   extraction parts, the K = 2 pairwise trainings and the CLM baseline side by side as
   `train-part` runs, the merge and the evaluation parts on fusellm-gpu. The merged model is
   registered in MLflow (its database in Postgres) with its files in the S3 store, and it and
   its `champion` alias show in the MLflow UI (screenshots kept);
4. the stack goes down and comes back up, and the runs, the model and its files are all there.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
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
from fusion_fixtures import (
    EVAL_DATA,
    as_pairwise_chat,
    build_models,
    champion_texts,
    chat_exchanges,
    fusion_dict,
    reseed_model,
    write_chat_corpus,
    write_corpus,
)
from support import api_json

pytestmark = [pytest.mark.slow, pytest.mark.containers, pytest.mark.timeout(3600)]

# The chat fusion's stage runs, each on its pool: pairwise, `train` finds the trainings done
# (the train-part runs) and merges.
STAGES = {"prepare": "fusellm-cpu", "align-fuse": "fusellm-cpu", "train": "fusellm-gpu"}
PARTS = ("extract-part", "train-part", "evaluate-part")  # fanned out over the GPU pool
PAIRS = ("llama-b", "llama-c")  # the pivot's retrained twins: K = 2 pairwise trainings
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
    """The tiny fusion's models, the pivot's two retrained twins, a text corpus and a chat
    corpus in the stack's S3 store, the evaluation data in the work volume; the text fusion's
    config as the `fuse` deployment's parameter."""
    from fusellm.io.sources import upload_dir

    root = tmp_path_factory.mktemp("stack-inputs")
    monkeypatch_module.setenv("FUSELLM_S3_ENDPOINT_URL", stack.s3_url)
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", stack.settings["S3_ACCESS_KEY"])
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", stack.settings["S3_SECRET_KEY"])
    texts = champion_texts()
    built = build_models(root / "models", texts)
    for seed, twin in enumerate(PAIRS, start=11):
        built[twin] = root / "models" / twin
        shutil.copytree(built["llama"], built[twin])
        reseed_model(built[twin], seed)
    for name, path in built.items():
        upload_dir(path, f"s3://fusellm/models/{name}")
    upload_dir(write_corpus(root / "corpus", texts), "s3://fusellm/corpus")
    upload_dir(write_chat_corpus(root / "chat", chat_exchanges(texts)), "s3://fusellm/chat")
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
def chat_config(fusion_config):
    """The FuseChat run: the Llama-style pivot and its two twins (the merged model beats every
    source on the held-out texts its replies hold, so `champion` moves to it), conversations,
    pairwise fusion, a task-arithmetic merge."""
    models = ("llama", *PAIRS)
    data = {**fusion_config, "name": "stack-chat"}
    data["target"] = {"uri": "s3://fusellm/models/llama"}
    data["sources"] = [{"uri": f"s3://fusellm/models/{n}", "name": n} for n in models]
    return as_pairwise_chat(data, "s3://fusellm/chat")


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


def _runs_by_deployment(stack: Stack, body: dict | None = None) -> list[tuple[str | None, dict]]:
    """(deployment name, flow run) for the runs `body` filters, from the REST API (the tests
    after the browser's cannot use the async client)."""
    deployments = {
        d["id"]: d["name"] for d in api_json(f"{stack.prefect_api}/deployments/filter", {})
    }
    runs = api_json(f"{stack.prefect_api}/flow_runs/filter", {"limit": 200, **(body or {})})
    return [(deployments.get(r["deployment_id"]), r) for r in runs]


def _container_id(run: dict) -> str:
    """The Docker worker records `<daemon>:<container id>` as the run's infrastructure."""
    return (run["infrastructure_pid"] or "").rsplit(":", 1)[-1]


def _artifact_keys(stack: Stack) -> list[str]:
    pages = stack.s3().get_paginator("list_objects_v2").paginate(Bucket="mlflow")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_gpu_pool_runs_one_stage_at_a_time(stack, fusion_config):
    """Two extraction runs of the text fusion submitted at once (the first extracts, the second
    finds the work done) run one after the other: the limits `fusellm pools` and compose.yaml configure (the pool's
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


# Playwright's sync API holds an event loop in this thread until the module ends: nothing after
# this test may call asyncio (the Prefect client); it and those after it use the REST API.
def test_chat_fusion_from_the_prefect_ui_form_runs_pairwise_on_the_pools_and_registers(
    stack, chat_config, page, tmp_path
):
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    shots = Path(os.environ.get("FUSELLM_UI_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {shots}")
    prefect = stack.prefect_api.removesuffix("/api")
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
    page.locator("textarea").first.fill(json.dumps({"config": chat_config}, indent=2))
    page.screenshot(path=str(shots / "2-fuse-form-json.png"))
    page.get_by_role("button", name="Submit", exact=True).click()

    deadline = time.monotonic() + 1800
    while True:
        runs = [r for r in _fuse_runs(stack) if r["id"] not in earlier]
        assert len(runs) <= 1, "one Submit, one flow run"
        if runs and runs[0]["state_type"] in FINAL:
            break
        assert time.monotonic() < deadline, runs and runs[0]["state_type"]
        time.sleep(5)
    TIMINGS["chat fusion from the UI"] = time.monotonic() - started
    fuse = runs[0]
    if fuse["state_type"] != "COMPLETED":  # the whole message: an assert's would be cut short
        pytest.fail(f"fuse ended {fuse['state_type']}: {fuse['state']['message']}\n"
                    + stack.logs("worker-cpu", "worker-gpu"))  # fmt: skip
    page.goto(f"{prefect}/runs/flow-run/{fuse['id']}")
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
    page.screenshot(path=str(shots / "3-fuse-run-completed.png"))

    # Every stage a run of its deployment, on its pool, in a container of its own.
    children = _runs_by_deployment(
        stack, {"flow_runs": {"parent_flow_run_id": {"any_": [fuse["id"]]}}}
    )
    stages = {name: r for name, r in children if name in STAGES}
    parts = [(name, r) for name, r in children if name in PARTS]
    assert {n: r["work_pool_name"] for n, r in stages.items()} == STAGES
    assert {name for name, _ in parts} == set(PARTS)
    assert {r["work_pool_name"] for _, r in parts} == {"fusellm-gpu"}
    models = {
        name: sorted(r["parameters"]["model"] for n, r in parts if n == name) for name in PARTS
    }
    assert models["train-part"] == ["baseline", *(f"pair-{m}" for m in PAIRS)]  # side by side
    assert len(models["extract-part"]) == 3  # one part a model
    # every model scored: the sources, the pairwise models, the merged one and the baseline
    assert set(models["evaluate-part"]) == {
        "fused", "baseline", "llama", *PAIRS, *(f"pair-{m}" for m in PAIRS)
    }  # fmt: skip
    mine = [*stages.values(), *(r for _, r in parts)]
    assert all(r["state_type"] == "COMPLETED" and r["parent_task_run_id"] for r in mine)
    containers = {_container_id(r) for r in [fuse, *mine]}
    assert len(containers) == 1 + len(mine) and all(len(c) == 64 for c in containers)

    # The merged model registered: MLflow's records in Postgres, its files in the S3 store.
    client = MlflowClient(stack.mlflow_url)
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1
    assert client.get_model_version_by_alias(MODEL, "champion").version == versions[0].version
    rows = stack.compose(
        "exec", "-T", "postgres", "psql", "-U", "fusellm", "-d", "mlflow", "-tA", "-c",
        "select name from registered_models",
    ).stdout.split()  # fmt: skip
    assert MODEL in rows
    keys = _artifact_keys(stack)
    assert any(k.endswith("model.safetensors") for k in keys), keys[:20]

    # The registered model and its alias in the MLflow UI.
    page.goto(f"{stack.mlflow_url}/#/models/{MODEL}")
    version = page.get_by_role("row").filter(has_text="Version 1")
    expect(version.get_by_text(re.compile(r"^@\s*champion$")).first).to_be_visible()  # its alias
    page.screenshot(path=str(shots / "4-mlflow-model-champion.png"))


# After the browser's test: Playwright's sync API holds an event loop in this thread until the
# module ends, so this one uses the REST API, not the async Prefect client.
def test_stack_restart_keeps_runs_model_and_artifacts(stack, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    # Runs that ended (scheduled `refusion` runs are the scheduler's to re-make at will).
    before = {r["id"]: r["state_type"] for _, r in _runs_by_deployment(stack)
              if r["state_type"] in FINAL}  # fmt: skip
    assert len(before) >= 5
    keys = _artifact_keys(stack)
    weights = next(k for k in keys if k.endswith("model.safetensors"))
    etag = stack.s3().head_object(Bucket="mlflow", Key=weights)["ETag"]

    started = time.monotonic()
    stack.compose("down", "--timeout", "30")
    assert not stack.container("postgres")
    stack.up()
    TIMINGS["restart"] = time.monotonic() - started

    after = {r["id"]: r["state_type"] for _, r in _runs_by_deployment(stack)}
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
