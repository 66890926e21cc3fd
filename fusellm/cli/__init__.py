"""The `fusellm` command line. Each stage module contributes its own sub-command."""

from __future__ import annotations

import typer

from fusellm.demo.run import demo_command
from fusellm.evaluate.cli import eval_command
from fusellm.cli.run import run_command
from fusellm.train.cli import train_command
from fusellm.cli.ui import ui_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def version() -> None:
    """Print the installed fusellm version."""
    from fusellm import __version__

    typer.echo(__version__)


app.command("demo")(demo_command)
app.command("run")(run_command)
app.command("ui")(ui_command)
app.command("train")(train_command)
app.command("eval")(eval_command)


def main() -> None:  # pragma: no cover - console entry point
    app()
