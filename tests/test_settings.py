"""Embedded defaults: one data folder, nothing the user set is overridden, UIs on loopback."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from fusellm import settings
from fusellm.cli import app
from fusellm.cli.ui import start_servers, stop_servers, wait_servers
from fusellm.settings import ServerCommand

ALL_KEYS = [
    "PREFECT_HOME",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
    *settings.TELEMETRY_OFF,
]


@pytest.fixture
def clean_env(monkeypatch):
    """No user settings; monkeypatch restores whatever apply_embedded_defaults writes."""
    for key in [*ALL_KEYS, settings.HOME_ENV]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_data_dir_prefers_argument_then_env_then_cwd(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    assert settings.data_dir() == tmp_path / ".fusellm"
    assert (tmp_path / ".fusellm").is_dir()
    clean_env.setenv(settings.HOME_ENV, str(tmp_path / "from-env"))
    assert settings.data_dir() == tmp_path / "from-env"
    assert settings.data_dir("relative/arg") == tmp_path / "relative" / "arg"
    assert (tmp_path / "relative" / "arg").is_dir()


def test_data_dir_rejects_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match=str(blocker)):
        settings.data_dir(blocker)


def test_defaults_fill_every_unset_variable(clean_env, tmp_path):
    values = settings.apply_embedded_defaults(tmp_path / "home")
    home = tmp_path / "home"
    assert values["PREFECT_HOME"] == str(home / "prefect")
    assert values["MLFLOW_TRACKING_URI"] == f"sqlite:///{home}/mlflow.db"
    assert values["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"
    assert values["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert values["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert values["DO_NOT_TRACK"] == "1"
    assert values["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert values["HF_HUB_DISABLE_TELEMETRY"] == "1"
    for key, value in values.items():
        assert os.environ[key] == value
    assert (home / "prefect").is_dir() and (home / "mlartifacts").is_dir()


def test_defaults_never_override_user_settings(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    clean_env.setenv("DO_NOT_TRACK", "0")
    clean_env.setenv("PREFECT_HOME", str(tmp_path / "mine"))
    values = settings.apply_embedded_defaults(tmp_path / "home")
    assert values["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert values["DO_NOT_TRACK"] == "0"
    assert values["PREFECT_HOME"] == str(tmp_path / "mine")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    # what the user left unset is still filled
    assert values["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_defaults_follow_fusellm_home(clean_env, tmp_path):
    clean_env.setenv(settings.HOME_ENV, str(tmp_path / "proj"))
    values = settings.apply_embedded_defaults()
    assert values["PREFECT_HOME"] == str(tmp_path / "proj" / "prefect")
    assert str(tmp_path / "proj" / "mlflow.db") in values["MLFLOW_TRACKING_URI"]


def test_ui_commands_bind_loopback_over_the_embedded_stores(tmp_path):
    commands = settings.ui_commands(tmp_path, prefect_port=4321, mlflow_port=5432)
    assert set(commands) == {"prefect", "mlflow"}
    prefect, mlflow = commands["prefect"], commands["mlflow"]
    for line in commands.values():
        assert "127.0.0.1" in line and "0.0.0.0" not in line
        shlex.split(line)  # a valid shell line
    assert f"PREFECT_HOME={tmp_path}/prefect" in prefect
    assert "PREFECT_UI_API_URL=http://127.0.0.1:4321/api" in prefect
    assert "server start --host 127.0.0.1 --port 4321" in prefect
    assert f"--backend-store-uri sqlite:///{tmp_path}/mlflow.db" in mlflow
    assert f"--default-artifact-root {tmp_path}/mlartifacts" in mlflow
    assert "--host 127.0.0.1 --port 5432" in mlflow
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in mlflow


def test_ui_command_prints_both_commands(tmp_path):
    result = CliRunner().invoke(app, ["ui", "--home", str(tmp_path), "--mlflow-port", "5111"])
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:4200" in result.output
    assert "http://127.0.0.1:5111" in result.output
    assert settings.ui_commands(tmp_path, mlflow_port=5111)["mlflow"] in result.output


def _sleeper(seconds: float) -> ServerCommand:
    return ServerCommand([sys.executable, "-c", f"import time; time.sleep({seconds})"], {}, "")


def test_servers_stop_together():
    procs = start_servers({"short": _sleeper(0.2), "long": _sleeper(120)})
    try:
        started = time.monotonic()
        assert wait_servers(procs, poll_s=0.05) == "short"
        assert time.monotonic() - started < 30
        assert procs["long"].poll() is None
    finally:
        stop_servers(procs, grace_s=10)
    assert procs["long"].poll() is not None
    assert procs["short"].returncode == 0


def test_stop_kills_a_server_that_ignores_sigint():
    stubborn = ServerCommand(
        [
            sys.executable,
            "-c",
            (
                "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(120)"
            ),
        ],
        {},
        "",
    )
    procs = {
        "stubborn": subprocess.Popen(stubborn.argv, stdout=subprocess.PIPE, start_new_session=True)
    }
    assert procs["stubborn"].stdout.readline().strip() == b"ready"
    stop_servers(procs, grace_s=0.5)
    procs["stubborn"].stdout.close()
    assert procs["stubborn"].returncode is not None and procs["stubborn"].returncode < 0


# --- what flows apply wherever they run; links; `fusellm serve` --------------------------------


def test_the_data_folder_is_exported_for_child_processes(clean_env, tmp_path):
    settings.apply_embedded_defaults(tmp_path / "home")
    assert os.environ[settings.HOME_ENV] == str(tmp_path / "home")


def test_flows_apply_the_tracking_defaults_and_leave_prefect_alone(clean_env, tmp_path):
    clean_env.setenv(settings.HOME_ENV, str(tmp_path / "proj"))
    values = settings.apply_tracking_defaults()
    assert values["MLFLOW_TRACKING_URI"] == settings.sqlite_uri(tmp_path / "proj" / "mlflow.db")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert "PREFECT_HOME" not in os.environ and "PREFECT_HOME" not in values
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")  # the user's server wins
    assert settings.apply_tracking_defaults()["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"


def test_ui_links_never_carry_credentials(clean_env):
    """Links are printed, logged, and stored in MLflow notes and Prefect logs."""
    clean_env.setenv("MLFLOW_TRACKING_URI", "https://fusellm:hunter2@mlflow.example:8443")
    clean_env.setenv("PREFECT_API_URL", "http://token@10.0.0.2:4200/api")
    for name in (settings.MLFLOW_UI_ENV, "PREFECT_UI_URL"):
        clean_env.delenv(name, raising=False)
    assert settings.mlflow_ui_url() == "https://mlflow.example:8443"
    assert settings.prefect_ui_url() == "http://10.0.0.2:4200"


def test_ui_urls_follow_the_servers_in_use(clean_env):
    for name in (settings.MLFLOW_UI_ENV, "PREFECT_UI_URL", "PREFECT_API_URL"):
        clean_env.delenv(name, raising=False)
    assert settings.mlflow_ui_url() == "http://127.0.0.1:5000"
    assert settings.prefect_ui_url() == "http://127.0.0.1:4200"
    clean_env.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example/")
    clean_env.setenv("PREFECT_API_URL", "http://10.0.0.2:4200/api")
    assert settings.mlflow_ui_url() == "https://mlflow.example"
    assert settings.prefect_ui_url() == "http://10.0.0.2:4200"
    clean_env.setenv(settings.MLFLOW_UI_ENV, "http://127.0.0.1:5123")
    assert settings.mlflow_ui_url() == "http://127.0.0.1:5123"


def _web(root, port: int, exit_after: float | None = None) -> ServerCommand:
    """An HTTP server of `root` on 127.0.0.1:`port`; with `exit_after`, it exits with code 3."""
    code = (
        "import functools, http.server, os, sys, threading\n"
        "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n"
        "server = http.server.HTTPServer(('127.0.0.1', int(sys.argv[2])), handler)\n"
        "if sys.argv[3] != 'None':\n"
        "    threading.Timer(float(sys.argv[3]), lambda: os._exit(3)).start()\n"
        "server.serve_forever()\n"
    )
    argv = [sys.executable, "-c", code, str(root), str(port), str(exit_after)]
    return ServerCommand(argv, {}, f"http://127.0.0.1:{port}")


@pytest.fixture
def site(tmp_path):
    """Files that answer the health checks of both servers."""
    root = tmp_path / "site"
    (root / "api").mkdir(parents=True)
    for page in ("api/health", "health", "index.html"):
        (root / page).write_text("true")
    return root


def _closed(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_serve_starts_the_servers_serves_the_flows_and_stops_everything(
    clean_env, tmp_path, site, monkeypatch
):
    """`fusellm serve` wiring: both servers answer before the deployments are served, the
    runner's environment points at them and at the project's store, everything stops after."""
    from support import free_port

    from fusellm.cli import serve as serve_cli

    ports = {"prefect": free_port(), "mlflow": free_port()}
    fake = {name: _web(site, port) for name, port in ports.items()}
    monkeypatch.setattr(serve_cli, "ui_servers", lambda home, **_: fake)
    config = tmp_path / "fusion.yaml"
    config.write_text(
        "target: {uri: model}\nsources: [{uri: model, name: a}]\ncorpus: {uri: c.jsonl}\n"
    )
    seen = {}

    def deploy(path, fusion):
        seen.update(path=path, name=fusion.name, api=os.environ["PREFECT_API_URL"])
        seen["ui"] = os.environ[settings.MLFLOW_UI_ENV]
        seen["up"] = not any(_closed(p) for p in ports.values())

    monkeypatch.setattr(serve_cli, "_deploy", deploy)
    code = serve_cli.serve(tmp_path / "home", config_file=config)
    assert code == 0
    assert seen == {
        "path": config.resolve(),
        "name": "fusion",
        "api": f"http://127.0.0.1:{ports['prefect']}/api",
        "ui": f"http://127.0.0.1:{ports['mlflow']}",
        "up": True,
    }
    assert os.environ["MLFLOW_TRACKING_URI"] == settings.sqlite_uri(tmp_path / "home/mlflow.db")
    assert all(_closed(p) for p in ports.values())
    assert (tmp_path / "home" / "logs" / "prefect-server.log").is_file()


def test_a_server_that_exits_stops_the_serving(tmp_path, site):
    """While the flows are served, a server that dies stops everything, with its exit code."""
    from support import free_port

    from fusellm.cli.ui import run_servers

    ports = {"web": free_port(), "short": free_port()}
    servers = {"web": _web(site, ports["web"]), "short": _web(site, ports["short"], 4)}

    def serve_forever(home, servers):
        while True:  # until the SIGTERM the watcher sends when "short" exits
            time.sleep(0.1)

    started = time.monotonic()
    code = run_servers(tmp_path, servers, while_up=serve_forever, log_dir=tmp_path / "logs")
    assert code == 3 and time.monotonic() - started < 60
    assert all(_closed(p) for p in ports.values())
