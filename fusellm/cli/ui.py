"""`fusellm ui`: the Prefect and MLflow UIs over the project's embedded stores, on 127.0.0.1.

By default it prints the two commands (so they can run in two terminals, or under a process
manager); `--start` runs both here and stops both on Ctrl-C or when either one exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer

from fusellm.settings import TELEMETRY_OFF, ServerCommand, data_dir, ui_commands, ui_servers

STOP_GRACE_S = 15.0


def start_servers(servers: dict[str, ServerCommand]) -> dict[str, subprocess.Popen]:
    """Start each server in its own process group, so that Ctrl-C reaches us and we stop them
    in order instead of both receiving it halfway through start-up."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, server in servers.items():
            env = {**os.environ, **TELEMETRY_OFF, **server.env}
            procs[name] = subprocess.Popen(server.argv, env=env, start_new_session=True)
    except OSError:
        stop_servers(procs)
        raise
    return procs


def stop_servers(procs: dict[str, subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGINT to each group (what both servers treat as a clean stop), then SIGKILL if needed."""
    for proc in procs.values():
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def wait_servers(procs: dict[str, subprocess.Popen], poll_s: float = 0.5) -> str:
    """Block until one server exits; return its name."""
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                return name
        time.sleep(poll_s)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def ui_command(
    start: Annotated[
        bool, typer.Option("--start", help="start both servers here and wait")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            "--home", "--data", help="project data folder (default: $FUSELLM_HOME, else ./.fusellm)"
        ),
    ] = None,
    prefect_port: Annotated[int, typer.Option(help="port of the Prefect UI on 127.0.0.1")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="port of the MLflow UI on 127.0.0.1")] = 5000,
) -> None:
    """Print (or with --start, run) the Prefect and MLflow UIs over the embedded stores."""
    home = data_dir(data)
    servers = ui_servers(home, prefect_port=prefect_port, mlflow_port=mlflow_port)
    commands = ui_commands(home, prefect_port=prefect_port, mlflow_port=mlflow_port)
    typer.echo(f"fusellm data folder: {home}")
    for name, server in servers.items():
        typer.echo(f"\n# {name} UI at {server.url}\n{commands[name]}")
    if not start:
        return
    # SIGTERM (a process manager, `kill`) must stop the servers too, not orphan them.
    signal.signal(signal.SIGTERM, _interrupt)
    procs = start_servers(servers)
    typer.echo("\nstarted both servers; Ctrl-C stops them")
    try:
        exited = wait_servers(procs)
        typer.echo(
            f"{exited} server exited (code {procs[exited].returncode}); stopping the other",
            err=True,
        )
        code = procs[exited].returncode or 1
    except KeyboardInterrupt:
        code = 0
    finally:
        stop_servers(procs)
    raise typer.Exit(code)
