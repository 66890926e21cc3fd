"""Embedded defaults: one project data folder holding Prefect's and MLflow's local state.

With no configuration at all, `fusellm run CONFIG` must work on one machine: Prefect runs on its
local ephemeral API and MLflow on a SQLite file plus an artifact folder, all under one data folder
(`$FUSELLM_HOME`, else `./.fusellm`). Everything here only sets environment variables, never
overriding one the user set, so a real Prefect server or MLflow server is chosen the usual way
(`PREFECT_API_URL`, `MLFLOW_TRACKING_URI`). Telemetry of every component is off by default: our
build and cluster machines have no internet, and a tool that phones home there stalls or logs
errors; users who want it set the variable themselves.

The data folder is exported as `$FUSELLM_HOME`, so processes started from a command (the flow
runs `fusellm serve` starts, a training launcher) agree on it. Flows apply the MLflow part of
these defaults themselves when they start (`apply_tracking_defaults`), wherever they run: a flow
run by a worker tracks to the project's store, not to MLflow's own default. Links in run
descriptions point at `mlflow_ui_url()` / `prefect_ui_url()`.

`PREFECT_HOME` in the data folder also means Prefect reads its profiles from there, not from
`~/.prefect`: set `PREFECT_HOME` (or `PREFECT_API_URL`) yourself to keep a configured server.
MLflow has no client variable for the artifact folder; `fusellm.tracking.ensure_experiment`
places new experiments' artifacts next to a local SQLite database instead.

No Prefect import here: the variables must be in place before Prefect reads its settings.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

HOME_ENV = "FUSELLM_HOME"
DEFAULT_HOME = ".fusellm"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
PREFECT_DIR = "prefect"
LOGS_DIR = "logs"
LOCALHOST = "127.0.0.1"
PREFECT_PORT = 4200  # where `fusellm ui` and `fusellm serve` put each UI by default
MLFLOW_PORT = 5000
# The MLflow UI that links in run descriptions and Prefect artifacts point at. With the embedded
# SQLite store the flows cannot know it: `fusellm serve` / `fusellm ui --start` set it.
MLFLOW_UI_ENV = "FUSELLM_MLFLOW_UI_URL"

# Variables that switch off usage reporting of the components we run, whatever the data folder.
TELEMETRY_OFF: dict[str, str] = {
    "DO_NOT_TRACK": "1",  # the common opt-out (Prefect's client and others)
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub, transformers, datasets, lm-eval
}


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The project data folder: `path`, else `$FUSELLM_HOME`, else `./.fusellm`; created, absolute.

    Absolute because the folder ends up inside URIs (`sqlite:///...`) that other processes read
    from other working directories.
    """
    chosen = path if path is not None else os.environ.get(HOME_ENV) or DEFAULT_HOME
    folder = Path(chosen).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"fusellm data folder {folder} exists but is not a folder "
            f"(set {HOME_ENV} or pass another path)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sqlite_uri(db_file: Path) -> str:
    """`sqlite:///` + absolute path (four slashes on POSIX), as MLflow and SQLAlchemy expect."""
    return "sqlite:///" + Path(db_file).resolve().as_posix()


def mlflow_artifact_root(path: str | os.PathLike | None = None) -> Path:
    """The embedded MLflow artifact folder (created)."""
    folder = data_dir(path) / MLFLOW_ARTIFACTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tracking_defaults(path: str | os.PathLike | None = None) -> dict[str, str]:
    """What a flow needs wherever it runs: the project's MLflow store and telemetry off."""
    home = data_dir(path)
    return {
        "MLFLOW_TRACKING_URI": sqlite_uri(home / MLFLOW_DB),
        # Job execution starts several worker processes (~2 GB) the local UI does not need.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # MLflow prints "View run ... at <tracking URI>" with any password the URI holds; our
        # own links (`mlflow_ui_url`) leave credentials out.
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        # A server that proxies artifacts (--serve-artifacts) would hand clients presigned URLs
        # of its object store, at the address the server reaches it by (`http://s3:9000` in the
        # compose stack), which the client often cannot reach: stream through the server.
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
        **TELEMETRY_OFF,
    }


def embedded_defaults(path: str | os.PathLike | None = None) -> dict[str, str]:
    """The variables `apply_embedded_defaults` would set, without touching the environment."""
    home = data_dir(path)
    return {
        "PREFECT_HOME": str(home / PREFECT_DIR),
        # A cold ephemeral API builds its database in ~20 s on 2 cores, the default limit.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        **tracking_defaults(home),
    }


def _apply(path: str | os.PathLike | None, values: dict[str, str]) -> dict[str, str]:
    home = data_dir(path)
    mlflow_artifact_root(home)
    # Exported, so that every process started from here (a flow run of `fusellm serve`, a
    # training launcher) finds the same data folder.
    os.environ[HOME_ENV] = str(home)
    for name, value in values.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in values}


def apply_embedded_defaults(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Set each embedded default the user has not set; return the values now in force.

    Call it before importing Prefect or MLflow clients: both read their settings at import or
    first use. The data folder itself is exported as `$FUSELLM_HOME`.
    """
    (data_dir(path) / PREFECT_DIR).mkdir(exist_ok=True)
    return _apply(path, embedded_defaults(path))


def apply_tracking_defaults(path: str | os.PathLike | None = None) -> dict[str, str]:
    """The part of the embedded defaults a flow applies when it starts, wherever it runs (in
    `fusellm run`, under `fusellm serve`, on a worker): MLflow's store of the data folder, unless
    the user chose a tracking server, and telemetry off. Prefect's own settings are left alone:
    a running flow has read them already."""
    return _apply(path, tracking_defaults(path))


def logs_dir(path: str | os.PathLike | None = None) -> Path:
    """Where commands write the full log of a failed run (created)."""
    folder = data_dir(path) / LOGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def without_credentials(url: str) -> str:
    """`url` without its user:password@ part: links are printed, logged and stored in MLflow
    and Prefect, so they never carry the credentials a tracking or API URL may hold."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def mlflow_ui_url() -> str:
    """The MLflow UI to link to: `$FUSELLM_MLFLOW_UI_URL`, else the tracking server itself, else
    where `fusellm ui` serves the embedded store."""
    chosen = os.environ.get(MLFLOW_UI_ENV)
    if chosen:
        return without_credentials(chosen.rstrip("/"))
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    if tracking.startswith(("http://", "https://")):
        return without_credentials(tracking.rstrip("/"))
    return f"http://{LOCALHOST}:{MLFLOW_PORT}"


def prefect_ui_url() -> str:
    """The Prefect UI to link to: `$PREFECT_UI_URL`, else the API's server, else where
    `fusellm ui` serves the embedded database (what the ephemeral API writes to)."""
    chosen = os.environ.get("PREFECT_UI_URL")
    if chosen:
        return without_credentials(chosen.rstrip("/"))
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if api.startswith(("http://", "https://")):
        return without_credentials(api.removesuffix("/api"))
    return f"http://{LOCALHOST}:{PREFECT_PORT}"


class ServerCommand(NamedTuple):
    """A server to start: argument vector plus the variables it needs on top of ours."""

    argv: list[str]
    env: dict[str, str]
    url: str


def _tool(name: str) -> str:
    """The tool installed next to this interpreter (works without activating the venv)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def ui_servers(
    path: str | os.PathLike | None = None,
    prefect_port: int = PREFECT_PORT,
    mlflow_port: int = MLFLOW_PORT,
) -> dict[str, ServerCommand]:
    """The Prefect and MLflow UI servers over the embedded stores, bound to 127.0.0.1 only."""
    home = data_dir(path)
    mlflow_url = f"http://{LOCALHOST}:{mlflow_port}"
    prefect_url = f"http://{LOCALHOST}:{prefect_port}"
    prefect = ServerCommand(
        argv=[
            _tool("prefect"),
            "server",
            "start",
            "--host",
            LOCALHOST,
            "--port",
            str(prefect_port),
        ],
        env={
            "PREFECT_HOME": str(home / PREFECT_DIR),
            "PREFECT_SERVER_API_HOST": LOCALHOST,
            "PREFECT_SERVER_API_PORT": str(prefect_port),
            # Without it the UI in the browser calls the default port, not ours.
            "PREFECT_UI_API_URL": f"{prefect_url}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        },
        url=prefect_url,
    )
    mlflow = ServerCommand(
        argv=[
            _tool("mlflow"), "ui",
            "--backend-store-uri", sqlite_uri(home / MLFLOW_DB),
            "--default-artifact-root", str(home / MLFLOW_ARTIFACTS),
            "--host", LOCALHOST,
            "--port", str(mlflow_port),
            "--workers", "1",
        ],
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
        url=mlflow_url,
    )  # fmt: skip
    return {"prefect": prefect, "mlflow": mlflow}


def shell_command(server: ServerCommand) -> str:
    """One line a user can paste into a POSIX shell."""
    assignments = [f"{name}={shlex.quote(value)}" for name, value in server.env.items()]
    return " ".join(assignments + [shlex.join(server.argv)])


def ui_commands(
    path: str | os.PathLike | None = None,
    prefect_port: int = PREFECT_PORT,
    mlflow_port: int = MLFLOW_PORT,
) -> dict[str, str]:
    """Shell commands that open each UI on 127.0.0.1 over the embedded stores."""
    servers = ui_servers(path, prefect_port=prefect_port, mlflow_port=mlflow_port)
    return {name: shell_command(server) for name, server in servers.items()}
