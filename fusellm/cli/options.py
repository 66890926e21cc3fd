"""Options that several commands take, spelled once so that they read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Home = Annotated[
    Path | None,
    typer.Option("--home", help="project data folder (default: $FUSELLM_HOME, else ./.fusellm)"),
]
PrefectPort = Annotated[int, typer.Option(help="port of the Prefect server and UI on 127.0.0.1")]
MlflowPort = Annotated[int, typer.Option(help="port of the MLflow server and UI on 127.0.0.1")]
