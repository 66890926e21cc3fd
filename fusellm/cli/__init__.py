"""The `fusellm` command line of the library: each part contributes its own sub-command.

The commands that run Prefect flows (`run`, `demo`) are added by `fusellm_flows.cli`, which is
what the installed `fusellm` command is; the library itself never imports the flows.
"""

from __future__ import annotations

import typer

from fusellm.cli.init import init_command
from fusellm.cli.models import models_app
from fusellm.cli.plan import plan_command
from fusellm.cli.schema import schema_command
from fusellm.cli.ui import ui_command
from fusellm.cli.validate import validate_command
from fusellm.evaluate.cli import eval_command
from fusellm.train.cli import train_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def version() -> None:
    """Print the installed fusellm version."""
    from fusellm import __version__

    typer.echo(__version__)


app.command("ui")(ui_command)
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("init")(init_command)
app.command("validate")(validate_command)
app.command("plan")(plan_command)
app.command("schema")(schema_command)
app.add_typer(models_app, name="models")
