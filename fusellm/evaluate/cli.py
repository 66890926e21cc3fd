"""`fusellm eval`: run one evaluation suite on a model folder and write its results."""

from __future__ import annotations

from pathlib import Path

import typer


def eval_command(
    model: Path = typer.Option(..., "--model", help="Hugging Face model folder (safetensors)."),
    suite: str = typer.Option(..., "--suite", help="bbh, commonsense, multipl-e or local."),
    output: Path = typer.Option(..., "--output", help="Folder for results and sample logs."),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="Local JSONL files in the Hub layout (<path>/<name>/<split>.jsonl).",
    ),
    source: str | None = typer.Option(
        None, "--source", help="hub, cache or local (default: local with --data-dir, else hub)."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Pre-filled datasets cache."),
    task: list[str] | None = typer.Option(None, "--task", help="Run only this task (repeat)."),
    limit: int | None = typer.Option(None, "--limit", help="At most this many documents per task."),
    batch_size: int = typer.Option(1, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
    max_gen_toks: int | None = typer.Option(None, "--max-gen-toks", help="Cap generation length."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow code shipped with the model (off by default)."
    ),
) -> None:
    """Evaluate a model on a suite (lm-eval) and write results.json, samples/ and the config."""
    from rich.console import Console
    from rich.table import Table

    from fusellm.evaluate.data import DataConfig, DataError
    from fusellm.evaluate.runner import run_suite

    console = Console()
    try:
        data = None
        if source or data_dir or cache_dir:
            data = DataConfig(source=source, data_dir=data_dir, cache_dir=cache_dir)
        result = run_suite(
            model,
            suite,
            output_dir=output,
            data=data,
            tasks=task or None,
            limit=limit,
            batch_size=batch_size,
            device=device,
            max_gen_toks=max_gen_toks,
            trust_remote_code=trust_remote_code,
        )
    except (DataError, FileNotFoundError, ValueError, KeyError) as error:
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
