"""`fusellm train CONFIG --model DIR --data DIR --output DIR` (or `python -m fusellm.train`).

The same entry serves one process and launchers:
`deepspeed --num_gpus 8 --module fusellm.train ...`,
`deepspeed --hostfile hosts --module fusellm.train ...` or
`torchrun --nproc_per_node 2 -m fusellm.train ...`; each rank reads its place from the launcher's variables (the `--local_rank`
argument the deepspeed launcher adds is accepted and ignored: LOCAL_RANK says the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def train_command(
    config: Annotated[Path, typer.Argument(help="YAML training config (fields of TrainConfig)")],
    model: Annotated[Path, typer.Option("--model", help="target model folder (safetensors)")],
    data: Annotated[Path, typer.Option("--data", help="fused top-k store, target's vocabulary")],
    output: Annotated[Path, typer.Option("--output", help="folder for checkpoints/ and model/")],
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint")] = True,
    local_rank: Annotated[
        int | None, typer.Option("--local_rank", "--local-rank", hidden=True)
    ] = None,
) -> None:
    """Continually train the target with the fusion loss (lam = 1 in CONFIG: the CLM baseline)."""
    from fusellm.train.config import TrainConfigError, load_config
    from fusellm.train.engine import train
    from fusellm.train.launch import write_result

    try:
        cfg = load_config(config)
        result = train(cfg, model, data, output, resume=resume)
    except TrainConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if result.model_dir is not None:  # rank 0: the record a launching stage reads back
        write_result(result, output)
        typer.echo(f"trained {result.steps} steps; model saved in {result.model_dir}")


def main() -> None:
    typer.run(train_command)
