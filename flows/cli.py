"""The installed `fusellm` command: the library's commands plus those that run Prefect flows.

`fusellm run CONFIG` runs the `fuse` flow on a YAML fusion config; `fusellm demo` runs the
miniature fusion through the same flow. With nothing configured, Prefect uses its local
ephemeral API and MLflow a SQLite store, both under the project data folder
(`fusellm.settings`); `PREFECT_API_URL` / `MLFLOW_TRACKING_URI` (or `tracking.tracking_uri` in
the config) point it at real servers instead. The config is read and checked before Prefect
starts, so a typo costs a second, not a server start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fusellm.cli import app

Home = Annotated[
    Path | None, typer.Option("--home", help="data folder for Prefect and MLflow state")
]


@app.command("run")
def run_command(
    config: Annotated[Path, typer.Argument(help="YAML fusion config (fields of FusionConfig)")],
    home: Home = None,
) -> None:
    """Fuse the sources of CONFIG into its target (the Prefect `fuse` flow)."""
    from fusellm.config import FusionConfigError, load_fusion_config
    from fusellm.settings import apply_embedded_defaults

    try:
        fusion = load_fusion_config(config)
    except FusionConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    apply_embedded_defaults(home)  # before Prefect and MLflow read their settings
    from fusellm_flows.fuse import fuse

    summary = fuse(fusion)
    typer.echo(
        json.dumps({k: summary[k] for k in ("scores", "registration", "fused_model")}, indent=2)
    )


@app.command("demo")
def demo_command(
    out: Annotated[
        Path, typer.Option("--out", help="folder for config, data, runs, report")
    ] = Path("fusellm-demo"),
    seed: Annotated[int, typer.Option(help="seeds sources and training")] = 0,
    home: Home = None,
) -> None:
    """Run the miniature FuseLLM demo on this CPU and write fusellm-demo/report.{json,md,png}."""
    from fusellm.demo.recipe import DEFAULT_DEMO_RECIPE
    from fusellm.demo.run import run_demo
    from fusellm.settings import apply_embedded_defaults

    apply_embedded_defaults(home)  # before Prefect is imported
    from fusellm_flows.fuse import fuse

    recipe = DEFAULT_DEMO_RECIPE.model_copy(update={"seed": seed})
    run_demo(fuse, out, recipe=recipe, home=home)


def main() -> None:  # pragma: no cover - console entry point
    app()
