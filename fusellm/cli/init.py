"""`fusellm init`: write a commented starter fusion config, and the schema editors check it with.

The starter names its schema on its first line (`fusion.schema.json`, relative to the file), so
the schema is written beside it: an editor with yaml-language-server then completes and checks
the file at once. An existing config is never overwritten without `--force`; the schema is
generated, so it is always refreshed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer


def write_starter(recipe: str, output: Path, *, force: bool = False) -> list[Path]:
    """Write the starter `recipe` to `output` and the schema beside it; the paths written."""
    from fusellm.cli.schema import schema_text
    from fusellm.cli.starters import starter
    from fusellm.io.files import write_text_atomic

    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; choose another --output or pass --force")
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, starter(recipe, str(output)))
    schema = output.parent / "fusion.schema.json"
    write_text_atomic(schema, schema_text())
    return [output, schema]


def init_command(
    recipe: Annotated[
        Literal["tiny", "7b"],
        typer.Option(help="tiny: a CPU fusion of two small local models; 7b: the paper's recipe"),
    ] = "tiny",
    output: Annotated[Path, typer.Option("--output", "-o", help="the config file to write")] = Path(
        "fusion.yaml"
    ),
    force: Annotated[bool, typer.Option(help="overwrite an existing config")] = False,
) -> None:
    """Write a commented starter fusion config (and fusion.schema.json beside it)."""
    try:
        written = write_starter(recipe, output, force=force)
    except FileExistsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    for path in written:
        typer.echo(f"wrote {path}")
    if recipe == "tiny":
        typer.echo(
            f"fill in the paths listed at the top of {output} (models/base, models/other, "
            f"corpus, eval), then: fusellm validate {output} && fusellm plan {output}"
        )
    else:
        typer.echo(f"next: fusellm validate {output} && fusellm plan {output}")
