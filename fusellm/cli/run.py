"""`fusellm run CONFIG`: run the `fuse` flow on a YAML fusion config, with embedded defaults.

With nothing configured, Prefect uses its local ephemeral API and MLflow a SQLite store, both
under the project data folder (`fusellm.settings`); `PREFECT_API_URL` / `MLFLOW_TRACKING_URI`
(or `tracking.tracking_uri` in the config) point it at real servers instead. The config is read
and checked before Prefect starts, so a typo costs a second, not a server start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def run_command(
    config: Annotated[Path, typer.Argument(help="YAML fusion config (fields of FusionConfig)")],
    home: Annotated[
        Path | None, typer.Option("--home", help="data folder for Prefect and MLflow state")
    ] = None,
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
    from flows.fuse import fuse

    summary = fuse(fusion)
    typer.echo(
        json.dumps({k: summary[k] for k in ("scores", "registration", "fused_model")}, indent=2)
    )
