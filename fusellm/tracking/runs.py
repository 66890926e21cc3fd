"""The runs of a fusion: its experiment, one parent run, a nested run per stage.

Experiments created here over a local SQLite store keep their artifacts next to the database
file, not in a `./mlruns` folder of whatever the working directory is. Stages in other
processes cannot find the parent through this process, so they pass `parent_run_id`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fusellm.io.files import exclusive_lock
from fusellm.settings import MLFLOW_ARTIFACTS, without_credentials
from fusellm.tracking.current import TrackingError, innermost_fusion, open_fusion
from fusellm.tracking.log import log_json
from fusellm.tracking.orphans import RunOver, close_orphans, owner_tags
from fusellm.tracking.redact import clean_tags, flatten_params, redact

log = logging.getLogger(__name__)

TAG_CODE_VERSION = "fusellm.code_version"
TAG_STAGE = "fusellm.stage"
# Stages whose runs record MLflow's system metrics (CPU, memory, GPU when pynvml is there): the
# long ones, where a stall or a memory ceiling is worth seeing next to the numbers.
SYSTEM_METRICS_STAGES = ("extract", "train")


def code_version() -> str:
    """Package version plus git commit: which code produced a run, for reproducing it."""
    from fusellm.train.card import code_version as _code_version

    return _code_version()


def readable_run_name(config: Any, when: datetime | None = None) -> str:
    """``<config name>-<8 hex of the config>-<UTC time>``: which fusion, which settings, when.

    `config`: a pydantic model (its JSON dump is hashed) with a `name`.
    """
    from fusellm.io.fingerprint import sha256_json

    when = when or datetime.now(timezone.utc)
    digest = sha256_json(config.model_dump(mode="json"))[:8]
    return f"{config.name}-{digest}-{when.astimezone(timezone.utc):%Y%m%d-%H%M%S}"


def _local_artifact_root() -> Path | None:
    """For a local SQLite store: the artifact folder beside the database file."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(unquote(uri[len("sqlite:///") :]))  # "/abs/x.db", or relative to the cwd
    return db.resolve().parent / MLFLOW_ARTIFACTS


_READY_STORES: set[str] = set()


def ready_store() -> None:
    """Create a SQLite store's tables under a lock beside the database file, once per process.

    MLflow creates them on first use without guarding against another process doing the same,
    so two fusions starting together on a fresh store would fail with "table already exists".
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///") or uri in _READY_STORES:
        return
    db = Path(unquote(uri.removeprefix("sqlite:///")))
    db.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(db.with_name(f".{db.name}.lock")):
        MlflowClient().search_experiments(max_results=1)
    _READY_STORES.add(uri)


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created if missing (artifacts beside a local SQLite store)."""
    ready_store()
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} is deleted at "
                f"{without_credentials(mlflow.get_tracking_uri())}: restore it "
                "(`mlflow experiments restore`) or choose another experiment name"
            )
        return found.experiment_id
    root = _local_artifact_root()
    location = None
    if root is not None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"
        location = (root / slug).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _close_orphans(experiment_id: str, run_over: RunOver | None) -> None:
    """Close what dead processes left RUNNING; a fusion never fails for want of tidying."""
    try:
        close_orphans(experiment_id, run_over)
    except MlflowException as err:
        log.warning("could not look for runs left RUNNING in experiment %s: %s", experiment_id, err)


@contextmanager
def fusion_run(
    name: str,
    *,
    experiment: str = "fusellm",
    params: Mapping[str, Any] | Any | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    run_over: RunOver | None = None,
) -> Iterator[str]:
    """The parent run of one fusion; yields its run id.

    `params` (a dict, pydantic model or dataclass) is logged flattened and as `config.json`,
    without secrets. The code version is always tagged. Nested inside an already active run
    (a sweep, say) rather than failing. The run ends FAILED if the block raises. First, runs of
    the experiment left RUNNING by a process that died are set KILLED (`orphans`; `run_over`
    asks the orchestrator whether its run is over).
    """
    previous_uri = mlflow.get_tracking_uri() if tracking_uri else None
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment_id = ensure_experiment(experiment)
        _close_orphans(experiment_id, run_over)
        all_tags = clean_tags({TAG_CODE_VERSION: code_version(), **owner_tags(), **(tags or {})})
        with (
            mlflow.start_run(
                run_name=name,
                experiment_id=experiment_id,
                tags=all_tags,
                nested=mlflow.active_run() is not None,
            ) as run,
            open_fusion(run.info.run_id),
        ):
            if params is not None:
                mlflow.log_params(flatten_params(params))
                log_json(redact(params), "config.json")
            yield run.info.run_id
    finally:
        if previous_uri is not None:
            mlflow.set_tracking_uri(previous_uri)


@contextmanager
def stage_run(
    stage: str,
    *,
    params: Mapping[str, Any] | Any | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    experiment: str = "fusellm",
    system_metrics: bool | None = None,
) -> Iterator[str]:
    """A run for one stage, nested under the fusion run; yields its run id.

    The parent is, in order: `parent_run_id`, the active run of this thread, the innermost
    fusion run open in this process. With none of them the stage gets a top-level run in
    `experiment`, so a stage can be run and tracked on its own. `system_metrics`: record
    MLflow's system metrics while the run is open (default: for `SYSTEM_METRICS_STAGES`).
    """
    if system_metrics is None:
        system_metrics = stage.startswith(SYSTEM_METRICS_STAGES)
    active = mlflow.active_run()
    if parent_run_id is None and active is not None:
        parent_run_id = active.info.run_id
    if parent_run_id is None:
        parent_run_id = innermost_fusion()
    if parent_run_id is not None:
        experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    else:
        experiment_id = ensure_experiment(experiment)
    all_tags = clean_tags({TAG_STAGE: stage, **owner_tags(), **(tags or {})})
    with mlflow.start_run(
        run_name=stage,
        experiment_id=experiment_id,
        nested=parent_run_id is not None,
        parent_run_id=parent_run_id,
        tags=all_tags,
        log_system_metrics=system_metrics,
    ) as run:
        if params is not None:
            mlflow.log_params(flatten_params(params))
        yield run.info.run_id
