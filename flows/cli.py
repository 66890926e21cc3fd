"""The installed `fusellm` command: the library's commands plus those that run Prefect flows.

`fusellm run CONFIG` runs the `fuse` flow on a YAML fusion config (`--set a.b=c` changes a field
of it); `fusellm demo` runs the miniature fusion through the same flow; `fusellm serve` (and
`fusellm ui --start`) starts the Prefect and MLflow servers and serves the flows' deployments.
With nothing configured, Prefect uses its local ephemeral API and MLflow a SQLite store, both
under the project data folder (`fusellm.settings`, `--home`); `PREFECT_API_URL` /
`MLFLOW_TRACKING_URI` (or `tracking.tracking_uri` in the config) point it at real servers
instead. The config is read and checked before Prefect starts, so a typo costs a second, not a
server start. A failed flow ends the command with one red line (the stage, the error, what to
do) and exit code 1; the traceback goes to a log file under the data folder, which it names.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from fusellm.cli import app
from fusellm.cli import serve as serve_cli
from fusellm.cli.options import Home

Sets = Annotated[
    list[str] | None,
    typer.Option("--set", help="change a field of the config: --set training.lam=0.5 (repeat)"),
]


def _serve_flows(config_file: Path, config) -> None:
    from fusellm_flows.serve import serve_deployments  # imports Prefect: after the settings

    serve_deployments(config_file, config)


serve_cli.use_deployments(_serve_flows)
app.command("serve")(serve_cli.serve_command)


def _load(config: Path, sets: list[str] | None):
    from fusellm.cli.overrides import load_config

    return load_config(config, sets or ())


def _run_flow(call, *, flow: str, home: Path, command: str):
    """Run `call()` (which runs the flow named `flow`) with its log in a file; a failure ends
    the command with one line."""
    from fusellm_flows.failures import failure_line, logged_to, new_log_file, record

    log = new_log_file(home, command)
    try:
        with logged_to(log):
            return call()
    except KeyboardInterrupt:
        typer.secho(f"interrupted; log: {log}", fg="red", err=True)
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001  (any error of the flow: reported, not dumped)
        record(error, log)
        typer.secho(failure_line(flow, error, log), fg="red", err=True)
        raise typer.Exit(1) from None


def _print_links(summary: dict, home: Path, config: Path) -> None:
    links = summary.get("links") or {}
    width = max((len(label) for label in links), default=0)
    typer.echo(f"\nfusion run {summary.get('run_name', '')}:")
    for label, url in links.items():
        typer.echo(f"  {label:<{width}}  {url}")
    if not os.environ.get("PREFECT_API_URL"):  # ran on the ephemeral API: no UI is up
        typer.echo(f"  (to open them: fusellm serve --home {home} --config {config})")


@app.command("run")
def run_command(
    config: Annotated[Path, typer.Argument(help="YAML fusion config (fields of FusionConfig)")],
    home: Home = None,
    sets: Sets = None,
) -> None:
    """Fuse the sources of CONFIG into its target (the Prefect `fuse` flow)."""
    from fusellm.config import FusionConfigError
    from fusellm.settings import apply_embedded_defaults, data_dir

    try:
        fusion = _load(config, sets)
    except FusionConfigError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    home = data_dir(home)
    apply_embedded_defaults(home)  # before Prefect and MLflow read their settings
    from fusellm_flows.fuse import fuse

    summary = _run_flow(lambda: fuse(fusion), flow="fuse", home=home, command="run")
    typer.echo(
        json.dumps({k: summary[k] for k in ("scores", "registration", "fused_model")}, indent=2)
    )
    _print_links(summary, home, config)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command("pools")
def pools_command(
    kind: Annotated[str, typer.Option("--type", help="docker or process")] = "docker",
    cpu_image: Annotated[str, typer.Option(envvar="FUSELLM_CPU_IMAGE")] = "fusellm:cpu",
    gpu_image: Annotated[str, typer.Option(envvar="FUSELLM_GPU_IMAGE")] = "fusellm:cuda",
    network: Annotated[
        str, typer.Option(envvar="FUSELLM_JOB_NETWORK", help="Docker network of the jobs")
    ] = "",
    network_mode: Annotated[
        str, typer.Option(envvar="FUSELLM_JOB_NETWORK_MODE", help="e.g. host")
    ] = "",
    volumes: Annotated[
        str, typer.Option(envvar="FUSELLM_JOB_VOLUMES", help="comma-separated SRC:DST[:ro]")
    ] = "",
    job_env: Annotated[
        str,
        typer.Option(
            envvar="FUSELLM_JOB_ENV",
            help="comma-separated names of variables of this environment to give every job",
        ),
    ] = "",
    gpus: Annotated[
        str, typer.Option(envvar="FUSELLM_JOB_GPUS", help="GPU jobs' devices: all, 0,1 or none")
    ] = "",
    gpu_concurrency: Annotated[
        int, typer.Option(help="GPU stage runs at once in the whole pool (= GPU machines)")
    ] = 1,
) -> None:
    """Create or update the work pools fusellm-cpu and fusellm-gpu (PREFECT_API_URL's server),
    and the automation that marks a run crashed when its worker is lost."""
    from fusellm_flows.pools import (
        CRASH_AUTOMATION,
        JobSettings,
        PoolSetupError,
        ensure_crash_detection,
        ensure_pools,
    )
    from fusellm_flows.pools import job_env as env_of

    try:
        settings = JobSettings(
            cpu_image=cpu_image,
            gpu_image=gpu_image,
            network=network or None,
            network_mode=network_mode or None,
            volumes=_split(volumes),
            env=env_of(_split(job_env), dict(os.environ)),
            gpus="" if gpus == "none" else gpus,
        )
        done = ensure_pools(kind, settings, gpu_concurrency)
    except PoolSetupError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    for name, what in done.items():
        typer.echo(f"work pool {name} ({kind}): {what}")
    typer.echo(f"automation {CRASH_AUTOMATION!r}: {ensure_crash_detection()}")


@app.command("demo")
def demo_command(
    out: Annotated[
        Path, typer.Option("--out", help="folder for config, data, runs, report")
    ] = Path("fusellm-demo"),
    seed: Annotated[int, typer.Option(help="seeds sources and training")] = 0,
    home: Home = None,
    real: Annotated[
        bool,
        typer.Option(
            "--real",
            help="fuse three real pretrained LLMs (SmolLM2-135M, Gemma-3-270M, "
            "Qwen2.5-Coder-0.5B; fetched once into the cache) instead of the built tiny ones",
        ),
    ] = False,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="fuse them as chat models (FuseChat): conversations built from Python's own "
            "files, one pairwise fusion per source, then a merge onto the target",
        ),
    ] = False,
) -> None:
    """Run the miniature FuseLLM demo on this CPU and write <out>/report.{json,md,png}."""
    from fusellm.demo.real import REAL_RECIPE
    from fusellm.demo.recipe import DEFAULT_DEMO_RECIPE
    from fusellm.demo.run import run_demo
    from fusellm.settings import apply_embedded_defaults, data_dir

    home = data_dir(home)
    apply_embedded_defaults(home)  # before Prefect is imported
    from fusellm_flows.fuse import fuse

    recipe = (REAL_RECIPE if real else DEFAULT_DEMO_RECIPE).model_copy(update={"seed": seed})
    _run_flow(
        lambda: run_demo(fuse, out, recipe=recipe, home=home, real=real, chat=chat),
        flow="fuse",
        home=home,
        command="demo",
    )


def _command(args: list[str]) -> str:
    return next((a for a in args if not a.startswith("-")), "")


def main() -> None:  # pragma: no cover - console entry point
    """The `fusellm` command. A command that needs a module of an extra that is not installed
    ends with one line naming the module and the extra, and exit code 1, not a traceback."""
    import sys

    from fusellm.extras import install_command, missing_extra

    command = _command(sys.argv[1:])
    try:
        app()
    except ModuleNotFoundError as err:
        # `fusellm train` / `eval` name their own extra; the flows need `orchestration`
        missing = missing_extra(err, prefer=(command, "orchestration"))
        if missing is None:
            raise
        module, extra = missing
        typer.secho(
            f"error: fusellm {command} needs {module}, which is not installed: "
            f"{install_command(extra)}",
            fg="red",
            err=True,
        )
        raise SystemExit(1) from None
    finally:  # Prefect's goodbye (stopping its temporary server) must not follow our last line
        logging.getLogger("prefect").setLevel(logging.WARNING)
