"""`fusellm ui`: the Prefect and MLflow UIs over the project's embedded stores, on 127.0.0.1.

By default it prints the two commands (so they can run in two terminals, or under a process
manager); `--start` does what `fusellm serve` does: runs both servers here, serves the flows'
deployments on them when the installed `fusellm` command provides them, and stops everything
on Ctrl-C or when either server exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fusellm.cli.options import Home, MlflowPort, PrefectPort
from fusellm.settings import (
    MLFLOW_PORT,
    PREFECT_PORT,
    TELEMETRY_OFF,
    ServerCommand,
    data_dir,
    ui_commands,
    ui_servers,
)

STOP_GRACE_S = 15.0
START_TIMEOUT_S = 240.0  # Prefect's first start builds its database and copies the UI build
# What answers once a server is ready; Prefect's UI comes up after its API on a first start.
HEALTH_PATHS = {"prefect": ("/api/health", "/"), "mlflow": ("/health",)}


def start_servers(
    servers: dict[str, ServerCommand], log_dir: Path | None = None
) -> dict[str, subprocess.Popen]:
    """Start each server in its own process group, so that Ctrl-C reaches us and we stop them
    in order instead of both receiving it halfway through start-up. With `log_dir`, each
    server's output goes to ``<log_dir>/<name>-server.log`` instead of this terminal."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, server in servers.items():
            env = {**os.environ, **TELEMETRY_OFF, **server.env}
            out = None
            if log_dir is not None:
                log_dir.mkdir(parents=True, exist_ok=True)
                out = (log_dir / f"{name}-server.log").open("ab")
            try:
                procs[name] = subprocess.Popen(
                    server.argv,
                    env=env,
                    start_new_session=True,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT if out is not None else None,
                )
            finally:
                if out is not None:
                    out.close()  # the server keeps its own handle
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


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def wait_healthy(
    servers: dict[str, ServerCommand],
    procs: dict[str, subprocess.Popen],
    timeout_s: float = START_TIMEOUT_S,
    poll_s: float = 0.5,
) -> None:
    """Block until every server answers on its health paths; raise if one exits or is late."""
    pending = [
        (name, servers[name].url + path)
        for name in servers
        for path in HEALTH_PATHS.get(name, ("/",))
    ]
    deadline = time.monotonic() + timeout_s
    while pending:
        name, url = pending[0]
        if procs[name].poll() is not None:
            raise RuntimeError(f"the {name} server exited with code {procs[name].returncode}")
        if _answers(url):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {name} server did not answer {url} within {timeout_s:.0f} s")
        time.sleep(poll_s)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _watch(procs: dict[str, subprocess.Popen], exited: list[str], stop: threading.Event) -> None:
    """When a server exits while the deployments are served, stop serving (SIGTERM to this
    process: the server-side runner then shuts down cleanly) and say which one."""
    while not stop.wait(1.0):
        for name, proc in procs.items():
            if proc.poll() is not None:
                exited.append(name)
                os.kill(os.getpid(), signal.SIGTERM)
                return


# What runs while both servers are up, until Ctrl-C or SIGTERM: given the data folder and the
# servers. The installed `fusellm` command (fusellm_flows.cli) serves the flows' deployments
# here; the library itself never imports Prefect, so without it the servers are only kept up.
WhileUp = Callable[[Path, dict[str, ServerCommand]], None]


def run_servers(
    home: Path,
    servers: dict[str, ServerCommand],
    *,
    while_up: WhileUp | None = None,
    before_ready: Callable[[], None] | None = None,
    log_dir: Path | None = None,
) -> int:
    """Start the servers, wait until they answer, run `while_up` (else wait), stop them all.

    `before_ready` runs while the servers start (preparing data side by side). Returns the exit
    code: 0 after Ctrl-C or SIGTERM, else the code of the server that exited (1 at least).
    """
    # SIGTERM (a process manager, `kill`) must stop the servers too, not orphan them; Ctrl-C
    # stops everything even when this command was started with SIGINT ignored (`cmd &`).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    procs: dict[str, subprocess.Popen] = {}
    exited: list[str] = []
    stop = threading.Event()
    code = 0
    try:
        procs.update(start_servers(servers, log_dir=log_dir))
        if before_ready is not None:
            before_ready()
        wait_healthy(servers, procs)
        for name, server in servers.items():
            typer.echo(f"{name} UI: {server.url}")
        if while_up is None:
            typer.echo("both servers are up; Ctrl-C stops them")
            exited.append(wait_servers(procs))
        else:
            threading.Thread(target=_watch, args=(procs, exited, stop), daemon=True).start()
            while_up(home, servers)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as err:
        typer.secho(f"error: {err}{_log_hint(log_dir)}", fg="red", err=True)
        code = 1
    finally:
        stop.set()
        stop_servers(procs)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    if exited:
        name = exited[0]
        typer.secho(
            f"the {name} server exited (code {procs[name].returncode}); stopped everything"
            f"{_log_hint(log_dir)}",
            fg="red",
            err=True,
        )
        code = procs[name].returncode or 1
    else:
        typer.echo("stopped the servers")
    return code


def _log_hint(log_dir: Path | None) -> str:
    return f" (server logs in {log_dir})" if log_dir is not None else ""


def ui_command(
    start: Annotated[
        bool,
        typer.Option("--start", help="start both servers here, as `fusellm serve` does"),
    ] = False,
    home: Home = None,
    prefect_port: PrefectPort = PREFECT_PORT,
    mlflow_port: MlflowPort = MLFLOW_PORT,
) -> None:
    """Print (or with --start, run) the Prefect and MLflow UIs over the embedded stores."""
    home = data_dir(home)
    if start:
        from fusellm.cli.serve import serve

        raise typer.Exit(serve(home, prefect_port=prefect_port, mlflow_port=mlflow_port))
    servers = ui_servers(home, prefect_port=prefect_port, mlflow_port=mlflow_port)
    commands = ui_commands(home, prefect_port=prefect_port, mlflow_port=mlflow_port)
    typer.echo(f"fusellm data folder: {home}")
    for name, server in servers.items():
        typer.echo(f"\n# {name} UI at {server.url}\n{commands[name]}")
    typer.echo("\n# or both, with the flows' deployments served: fusellm serve")
