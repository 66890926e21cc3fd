"""`fusellm serve`: the user's whole setup on one machine, in one command, on 127.0.0.1.

1. starts the Prefect server and the MLflow server over the project's data folder (the
   embedded stores of `fusellm.settings`; server logs in ``<home>/logs``);
2. meanwhile prepares the fusion the deployments offer by default: `--config FILE`, else the
   demo's config, built in the data folder the first time (``<home>/demo``; `--demo-size tiny`
   builds models of a few thousand parameters in seconds, for smoke tests);
3. serves the deployments of the `fuse` flow, of each stage flow (`prepare`, `extract`,
   `align-fuse`, `train`) and of the weekly `refusion`, with that config as the form's default,
   so that "Run" in the Prefect UI executes here with nothing else to start;
4. Ctrl-C (or SIGTERM) stops the runs in progress and both servers.

Flow runs started here track to the project's MLflow store and link to this MLflow UI.

Serving the deployments needs Prefect, which the library never imports: the installed
`fusellm` command (`fusellm_flows.cli`) hands in the function that does it (`use_deployments`).
`fusellm ui --start` is the same command with the defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fusellm.cli.options import Home, MlflowPort, PrefectPort
from fusellm.config import FusionConfig
from fusellm.settings import (
    MLFLOW_DB,
    MLFLOW_PORT,
    MLFLOW_UI_ENV,
    PREFECT_PORT,
    apply_embedded_defaults,
    data_dir,
    logs_dir,
    sqlite_uri,
    ui_servers,
)

DEMO_FOLDERS = {"full": "demo", "tiny": "demo-tiny", "real": "demo-real"}

# (config file, parsed config) -> serve the deployments until Ctrl-C / SIGTERM.
Deploy = Callable[[Path, FusionConfig], None]
_deploy: Deploy | None = None


def use_deployments(deploy: Deploy) -> None:
    """What serves the flows' deployments (set by the installed command, which has Prefect)."""
    global _deploy
    _deploy = deploy


def demo_config_file(home: Path, size: str = "full") -> Path:
    return home / DEMO_FOLDERS[size] / "config.yaml"


def ensure_demo_config(home: Path, size: str = "full") -> tuple[Path, FusionConfig]:
    """The demo's config in the data folder, built the first time (or when its sources are gone
    from the cache); later calls read it back."""
    from fusellm.config import load_fusion_config
    from fusellm.demo.run import demo_recipes, prepare_demo

    path = demo_config_file(home, size)
    if path.is_file():
        config = load_fusion_config(path)
        if all(Path(ref.uri).exists() for ref in [config.target, *config.sources]):
            typer.echo(f"demo config: {path} (built earlier)")
            return path, config
    typer.echo(f"building the {size} demo's models and data in {path.parent} (first time only)")
    recipe, sources = demo_recipes(size)
    from rich.console import Console

    return prepare_demo(
        path.parent, recipe=recipe, sources_recipe=sources, console=Console(), real=size == "real"
    )


def serve(
    home: Path | None = None,
    *,
    prefect_port: int = PREFECT_PORT,
    mlflow_port: int = MLFLOW_PORT,
    config_file: Path | None = None,
    demo_size: str = "full",
) -> int:
    """Start both servers, serve the deployments on them until Ctrl-C; the exit code."""
    from fusellm.cli.ui import run_servers
    from fusellm.extras import require

    require("prefect", "mlflow")  # the servers' programs come with them
    home = data_dir(home)
    values = apply_embedded_defaults(home)
    servers = ui_servers(home, prefect_port=prefect_port, mlflow_port=mlflow_port)
    log_dir = logs_dir(home)
    typer.echo(f"fusellm data folder: {home}; server logs in {log_dir}")
    prepared: dict[str, tuple[Path, FusionConfig]] = {}

    def prepare() -> None:  # while the servers start
        if _deploy is None:
            return
        if config_file is not None:
            from fusellm.config import load_fusion_config

            prepared["config"] = (config_file.resolve(), load_fusion_config(config_file))
        else:
            prepared["config"] = ensure_demo_config(home, demo_size)

    def while_up(home: Path, servers) -> None:
        # Flow runs started from here (subprocesses of the runner) inherit these.
        os.environ["PREFECT_API_URL"] = f"{servers['prefect'].url}/api"
        if values["MLFLOW_TRACKING_URI"] == sqlite_uri(home / MLFLOW_DB):
            os.environ[MLFLOW_UI_ENV] = servers["mlflow"].url
        path, config = prepared["config"]
        typer.echo(
            f"serving the fusellm deployments with {path} as the default config; open "
            f"{servers['prefect'].url}/deployments, pick `fuse` and press Run. Ctrl-C stops "
            "everything."
        )
        _deploy(path, config)

    return run_servers(
        home,
        servers,
        while_up=while_up if _deploy is not None else None,
        before_ready=prepare,
        log_dir=log_dir,
    )


def serve_command(
    home: Home = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="fusion config the deployments offer by default (default: the demo's)"
        ),
    ] = None,
    demo_size: Annotated[
        str,
        typer.Option(
            "--demo-size",
            help="without --config: the demo to build (full; tiny: seconds-sized models; "
            "real: three real pretrained LLMs, fetched once)",
        ),
    ] = "full",
    prefect_port: PrefectPort = PREFECT_PORT,
    mlflow_port: MlflowPort = MLFLOW_PORT,
) -> None:
    """Start the Prefect and MLflow servers and serve the fusion flows' deployments (fuse, its
    stages, the weekly refusion) on 127.0.0.1; Ctrl-C stops everything."""
    from fusellm.config import FusionConfigError

    if demo_size not in DEMO_FOLDERS:
        typer.secho(
            f"error: --demo-size {demo_size!r}: expected one of {', '.join(DEMO_FOLDERS)}",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    try:
        code = serve(
            home,
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            config_file=config,
            demo_size=demo_size,
        )
    except FusionConfigError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)
