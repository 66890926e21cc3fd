"""MLflow runs left RUNNING by a process that died are set KILLED by the next fusion
(`fusellm.tracking.orphans`); runs whose owner may still be working are left alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import mlflow
from mlflow import MlflowClient

from fusellm.tracking import fusion_run
from fusellm.tracking.orphans import (
    TAG_CLOSED,
    TAG_HOST,
    TAG_ORCHESTRATOR_RUN,
    TAG_PID,
    TAG_STARTED,
    set_orchestrator_run,
    why_gone,
)

KILLED_FUSION = textwrap.dedent(
    """
    import os, signal
    from fusellm.tracking import fusion_run, stage_run
    with fusion_run("doomed", experiment="orphans"):
        with stage_run("extract"):
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _running(experiment: str) -> list:
    found = MlflowClient().get_experiment_by_name(experiment)
    return MlflowClient().search_runs(
        [found.experiment_id], filter_string="attributes.status = 'RUNNING'"
    )


def test_runs_of_a_killed_fusion_are_closed_by_the_next_one(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(uri)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_FUSION], cwd=tmp_path, timeout=300, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    left = _running("orphans")
    assert sorted(r.info.run_name for r in left) == ["doomed", "extract"]
    owners = {(r.data.tags[TAG_HOST], r.data.tags[TAG_PID]) for r in left}
    assert (
        owners
        == {(socket.gethostname(), left[0].data.tags[TAG_PID])}
        != {(socket.gethostname(), str(os.getpid()))}
    )  # both owned by the killed process

    with fusion_run("next", experiment="orphans") as run_id:
        assert [r.info.run_id for r in _running("orphans")] == [run_id]  # only its own
    for old in left:
        run = MlflowClient().get_run(old.info.run_id)
        assert run.info.status == "KILLED"
        assert run.info.end_time is not None
        assert "is gone" in run.data.tags[TAG_CLOSED]


def test_only_owners_known_to_be_gone_are_judged_gone():
    here = socket.gethostname()
    me = {TAG_HOST: here, TAG_PID: str(os.getpid())}
    assert why_gone(me) is None  # this process: alive
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = {TAG_HOST: here, TAG_PID: str(sleeper.pid)}
        assert why_gone(alive) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "is gone" in why_gone(alive)
    reused = {**me, TAG_PID: "1", TAG_STARTED: "not-when-pid-1-started"}
    assert "another's now" in why_gone(reused)
    elsewhere = {TAG_HOST: "some-other-machine", TAG_PID: "1"}
    assert why_gone(elsewhere) is None  # nothing here can tell
    orchestrated = {**elsewhere, TAG_ORCHESTRATOR_RUN: "run-7"}
    assert why_gone(orchestrated, lambda run: run == "run-7") == (
        "its Prefect flow run run-7 is over"
    )
    assert why_gone(orchestrated, lambda run: False) is None
    assert why_gone(orchestrated, lambda run: None) is None  # the server cannot say


def test_runs_name_their_orchestrator_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    set_orchestrator_run("flow-run-42")
    try:
        with fusion_run("owned", experiment="orphans") as run_id:
            tags = MlflowClient().get_run(run_id).data.tags
    finally:
        set_orchestrator_run(None)
    assert tags[TAG_ORCHESTRATOR_RUN] == "flow-run-42"
    assert tags[TAG_HOST] == socket.gethostname() and tags[TAG_PID] == str(os.getpid())
