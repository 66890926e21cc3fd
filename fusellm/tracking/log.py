"""Logging into the current run: metrics, files, JSON, figures and tags.

Thin wrappers over `MlflowClient` with an explicit run id rather than MLflow's fluent API, so
that a stage in a worker thread (no active run of its own) still writes into the fusion run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric

from fusellm.tracking.current import require_run
from fusellm.tracking.redact import clean_tags, plain


def _metric_name(prefix: str, key: str) -> str:
    if not prefix:
        return key
    return f"{prefix}{key}" if prefix.endswith(("/", ".")) else f"{prefix}/{key}"


def log_metrics(
    metrics: Mapping[str, float],
    step: int | None = None,
    *,
    prefix: str = "",
    run_id: str | None = None,
) -> None:
    """Log numbers; `prefix="align"` turns `coverage` into `align/coverage`.

    A value that is not a real number raises before anything is logged, naming the metric.
    """
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
            raise TypeError(
                f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}"
            )
        values[_metric_name(prefix, str(key))] = float(value)
    run_id = require_run("log_metrics", run_id)
    if values:
        now = int(time.time() * 1000)
        MlflowClient().log_batch(
            run_id, metrics=[Metric(k, v, now, step or 0) for k, v in values.items()]
        )


def log_artifact(
    path: str | os.PathLike, artifact_path: str | None = None, *, run_id: str | None = None
) -> None:
    """Log a file, or a folder with its contents (under `artifact_path`, else the folder's name)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot log artifact {path}: it does not exist")
    run_id = require_run("log_artifact", run_id)
    client = MlflowClient()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path or path.name)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def _json_default(obj: Any) -> Any:
    converted = plain(obj)
    if converted is not obj:
        return converted
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def log_json(obj: Any, artifact_file: str, *, run_id: str | None = None) -> None:
    """Write `obj` as indented JSON to `artifact_file` (a path inside the run's artifacts)."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=True)
    MlflowClient().log_text(require_run("log_json", run_id), text, artifact_file)


def log_figure(figure: Any, artifact_file: str, *, run_id: str | None = None) -> None:
    """Log a matplotlib figure as an image artifact (`*.png`, `*.svg`...)."""
    MlflowClient().log_figure(require_run("log_figure", run_id), figure, artifact_file)


def set_tags(tags: Mapping[str, Any], *, run_id: str | None = None) -> None:
    """Tag the current run (secret keys dropped)."""
    run_id = require_run("set_tags", run_id)
    client = MlflowClient()
    for key, value in clean_tags(tags).items():
        client.set_tag(run_id, key, value)
