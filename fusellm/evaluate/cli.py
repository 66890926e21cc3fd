"""`fusellm eval`: run one evaluation suite on a model and write its results.

The model is a local folder or a reference like those of a fusion config: ``hf://org/name``
(optionally ``@revision``) or ``s3://bucket/prefix``, resolved and fetched by
`fusellm.io.sources` (the Hub's cache; S3 downloads under the data folder). The device is CUDA
when there is one, unless `--device` says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fusellm.cli.options import Home

REMOTE = ("hf://", "s3://")


def pick_device(choice: str) -> str:
    """`auto`: cuda when torch sees a GPU, else cpu; anything else as given."""
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def local_model(model: str, *, home: Path | None = None, trust_remote_code: bool = False) -> Path:
    """A local folder holding `model`: the folder itself, or the Hub / S3 model fetched."""
    if not model.startswith(REMOTE):
        return Path(model)
    from fusellm.io.sources import ModelRef, fetch
    from fusellm.settings import data_dir

    ref = ModelRef(uri=model, trust_remote_code=trust_remote_code)
    return fetch(ref, data_dir(home) / "models")


def eval_command(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="model folder (safetensors), hf://org/name[@revision] or s3://bucket/prefix.",
        ),
    ],
    suite: Annotated[
        str, typer.Option("--suite", help="bbh, commonsense, multipl-e, local or custom.")
    ],
    output: Annotated[Path, typer.Option("--output", help="Folder for results and sample logs.")],
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Local JSONL files in the Hub layout (<path>/<name>/<split>.jsonl).",
        ),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--source", help="hub, cache or local (default: local with --data-dir, else hub)."
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Pre-filled datasets cache.")
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            help="Run only this task of the suite (repeat); with --suite custom: an lm-eval "
            "task or group to run, or one of --task-dir.",
        ),
    ] = None,
    task_dir: Annotated[
        Path | None,
        typer.Option("--task-dir", help="With --suite custom: a folder of lm-eval task YAMLs."),
    ] = None,
    chat_template: Annotated[
        bool,
        typer.Option("--chat-template", help="Render prompts with the model's chat template."),
    ] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", help="At most this many documents per task.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 1,
    device: Annotated[
        str, typer.Option("--device", help="auto (cuda if available, else cpu), cpu, cuda[:N].")
    ] = "auto",
    max_gen_toks: Annotated[
        int | None, typer.Option("--max-gen-toks", help="Cap generation length.")
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code", help="Allow code shipped with the model (off by default)."
        ),
    ] = False,
    home: Home = None,
) -> None:
    """Evaluate a model on a suite (lm-eval) and write results.json, samples/ and the config."""
    from rich.console import Console
    from rich.table import Table

    from fusellm.evaluate.data import DataError, EvalDataSource
    from fusellm.evaluate.runner import run_suite
    from fusellm.evaluate.suites import CUSTOM, CustomTasks
    from fusellm.io.uris import SourceError

    console = Console()
    try:
        model_dir = local_model(model, home=home, trust_remote_code=trust_remote_code)
        data = None
        if source or data_dir or cache_dir:
            data = EvalDataSource(source=source, data_dir=data_dir, cache_dir=cache_dir)
        custom = CustomTasks(tuple(task or ()), task_dir) if suite == CUSTOM else None
        result = run_suite(
            model_dir,
            suite,
            output_dir=output,
            data=data,
            tasks=None if custom else task or None,
            limit=limit,
            batch_size=batch_size,
            device=pick_device(device),
            max_gen_toks=max_gen_toks,
            trust_remote_code=trust_remote_code,
            chat_template=chat_template,
            custom=custom,
        )
    except (DataError, SourceError, FileNotFoundError, ValueError, KeyError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2)
    table = Table(title=f"{suite} on {result.model}")
    for column in ("task", "metric", "value", "stderr"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for name, metrics in result.metrics.items():
        # the suite's primary metric where the task has it, else each of the task's own metrics
        shown = [result.primary_metric] if result.primary_metric in metrics else sorted(metrics)
        for metric in shown:
            err = result.stderr.get(name, {}).get(metric)
            table.add_row(
                name, metric, f"{metrics[metric]:.4f}", "–" if err is None else f"{err:.4f}"
            )
    average = result.average
    table.add_row(
        "average", result.primary_metric, "–" if average is None else f"{average:.4f}", ""
    )
    console.print(table)
    for name, reason in result.skipped.items():
        console.print(f"skipped {name}: {reason}", highlight=False)
    console.print(f"results in {output}")
