"""Which MLflow run a logging call writes to, from any thread of the process.

MLflow's active run is thread-local, but Prefect runs stages in worker threads that cannot see
the run the flow's thread opened. So open fusion runs are also kept here, innermost last, and a
call with no active run in its thread falls back to them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow

_open_fusions: list[str] = []
_lock = threading.Lock()


class TrackingError(RuntimeError):
    """Tracking was asked for something it cannot do (no open run, unknown alias...)."""


@contextmanager
def open_fusion(run_id: str) -> Iterator[None]:
    """Make `run_id` the process-wide fallback run while the block runs."""
    with _lock:
        _open_fusions.append(run_id)
    try:
        yield
    finally:
        with _lock:
            _open_fusions.remove(run_id)


def innermost_fusion() -> str | None:
    """The most recently opened fusion run still open in this process, if any."""
    with _lock:
        return _open_fusions[-1] if _open_fusions else None


def current_run_id() -> str | None:
    """The run that logging calls in this thread write to: the active run, else the open fusion."""
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id
    return innermost_fusion()


def require_run(what: str, run_id: str | None) -> str:
    """`run_id`, else the current run; a call with neither fails saying how to open one."""
    run_id = run_id or current_run_id()
    if run_id is None:
        raise TrackingError(
            f"{what} needs an open MLflow run: call it inside fusion_run(...) or stage_run(...), "
            "or pass run_id"
        )
    return run_id
