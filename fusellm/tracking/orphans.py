"""Runs whose process died: closed by the next fusion instead of staying RUNNING forever.

A fusion killed with SIGKILL, or a worker whose machine is lost, cannot end its MLflow runs;
MLflow shows them RUNNING for good. So every fusion and stage run carries tags saying who owns
it: the host, the process id and the process's start time, and the orchestrator's run when
there is one (`set_orchestrator_run`: the Prefect flow run). When a fusion starts, every
RUNNING run of its experiment whose owner is gone is set KILLED, with a tag saying why
(`close_orphans`):

- the orchestrator says its run is over (Crashed, Failed, Cancelled, Completed, deleted), or
- it was started on this host by a process that no longer exists (the pid is gone, or now
  belongs to a process started at another time).

A run owned by a live process, or by another host with no orchestrator to ask, is left alone:
only its owner can say it is finished.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from mlflow import MlflowClient

log = logging.getLogger(__name__)

TAG_HOST = "fusellm.owner.host"
TAG_PID = "fusellm.owner.pid"
TAG_STARTED = "fusellm.owner.started"  # the process's start time, against pid reuse
TAG_ORCHESTRATOR_RUN = "fusellm.owner.prefect_flow_run"
TAG_CLOSED = "fusellm.closed_because"

_orchestrator_run: str | None = None

RunOver = Callable[[str], bool | None]  # orchestrator run id -> over? (None: cannot tell)


def set_orchestrator_run(run_id: str | None) -> None:
    """The orchestrator's run this process works for (Prefect's flow run id), or None."""
    global _orchestrator_run
    _orchestrator_run = run_id


def process_started(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot, from /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def owner_tags() -> dict[str, str]:
    """Who owns a run started now: this host and process, and the orchestrator's run."""
    tags = {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}
    started = process_started(os.getpid())
    if started is not None:
        tags[TAG_STARTED] = started
    if _orchestrator_run:
        tags[TAG_ORCHESTRATOR_RUN] = _orchestrator_run
    return tags


def why_gone(tags: dict[str, str], run_over: RunOver | None = None) -> str | None:
    """Why the owner of a run with these tags is gone, or None if it may still be working."""
    orchestrated = tags.get(TAG_ORCHESTRATOR_RUN)
    if orchestrated and run_over is not None:
        if run_over(orchestrated):
            return f"its Prefect flow run {orchestrated} is over"
        return None
    if tags.get(TAG_HOST) != socket.gethostname() or TAG_PID not in tags:
        return None
    pid = int(tags[TAG_PID])
    if pid == os.getpid():
        return None
    if not os.path.exists("/proc"):  # no start times to compare: whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"its process {pid} on {tags[TAG_HOST]} is gone"
        except OSError:
            pass
        return None
    started = process_started(pid)
    if started is None:
        return f"its process {pid} on {tags[TAG_HOST]} is gone"
    if started is not None and tags.get(TAG_STARTED) not in (None, started):
        return f"its process {pid} on {tags[TAG_HOST]} is gone (the pid is another's now)"
    return None


def close_orphans(experiment_id: str, run_over: RunOver | None = None) -> list[str]:
    """Set every RUNNING run of the experiment whose owner is gone to KILLED; their ids."""
    client = MlflowClient()
    closed = []
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    for run in running:
        reason = why_gone(run.data.tags, run_over)
        if reason is None:
            continue
        client.set_tag(run.info.run_id, TAG_CLOSED, reason)
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("MLflow run %s was left RUNNING; set KILLED: %s", run.info.run_id, reason)
        closed.append(run.info.run_id)
    return closed
