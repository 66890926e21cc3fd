"""Training on every GPU of the machine, from a stage that runs in one Python process.

A stage runs in one process (a Prefect task of a worker's flow run, a container on the GPU
pool); `train()` there would use one GPU of eight. So with several GPUs visible, and no launcher
around the process already, the training stage starts the DeepSpeed launcher
(`deepspeed --num_gpus N --module fusellm.train ...`: one process per GPU) and waits for it.
Rank 0 writes the run's result to `<output>/result.json`, which the stage reads back, and the
stage logs the loss of each step to its MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from fusellm.train.config import TrainConfig
from fusellm.train.engine import TrainResult, _free_port

RESULT_FILE = "result.json"
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
LOG_TAIL_CHARS = 4000


class LaunchError(RuntimeError):
    """The launched training failed: says how it ended and where its log is."""


def processes_for(gpus: int, environ: dict[str, str] | None = None) -> int:
    """One process per GPU when there are several and no launcher started this one; else 1."""
    environ = os.environ if environ is None else environ
    if gpus > 1 and not any(name in environ for name in LAUNCHER_VARIABLES):
        return gpus
    return 1


def write_result(result: TrainResult, output: Path) -> None:
    """Rank 0's record of the run, for the process that launched it."""
    from fusellm.io.files import write_json_atomic

    record = {
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "losses": result.losses,
        "tokens": result.tokens,
    }
    write_json_atomic(output / RESULT_FILE, record)


def read_result(output: Path) -> TrainResult:
    record = json.loads((output / RESULT_FILE).read_text())
    model_dir = record.pop("model_dir", None)
    model_dir = Path(model_dir) if model_dir else None
    return TrainResult(model_dir=model_dir, **record)


def _devices(processes: int, environ) -> list[str]:
    """The launcher's device options. With `--num_gpus` it drops CUDA_VISIBLE_DEVICES and takes
    GPUs 0..N-1: the GPUs this process was given must be named instead."""
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    if re.fullmatch(r"\d+(,\d+)*", visible):
        return ["--include", f"localhost:{visible}"]
    return ["--num_gpus", str(processes)]


def launcher_command(
    processes: int, config_file: Path, model, data, output: Path, environ=None
) -> list[str]:
    environ = os.environ if environ is None else environ
    return [
        sys.executable, "-m", "deepspeed.launcher.runner",
        *_devices(processes, environ),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "--module", "fusellm.train", str(config_file),
        "--model", str(model), "--data", str(data), "--output", str(output),
    ]  # fmt: skip


def launch(
    config: TrainConfig, model, data, output: str | os.PathLike, *, processes: int
) -> TrainResult:
    """Run the training in `processes` processes under the DeepSpeed launcher; wait for it.

    The config goes to `<output>/train-config.yaml` and the launcher's output to
    `<output>/launch.log`; a run that fails raises LaunchError with the end of that log.
    """
    from fusellm.io.files import write_text_atomic

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config_file = write_text_atomic(
        output / "train-config.yaml", yaml.safe_dump(config.model_dump(mode="json"))
    )
    (output / RESULT_FILE).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    log = output / "launch.log"
    command = launcher_command(processes, config_file, model, data, output, env)
    returncode = run_logged(command, env, log)
    if returncode != 0 or not (output / RESULT_FILE).is_file():
        tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        raise LaunchError(
            f"training in {processes} processes under the DeepSpeed launcher exited with code "
            f"{returncode}; its log is {log}, which ends with:\n{tail}"
        )
    result = read_result(output)
    _log_losses(result)
    return result


def run_logged(command: list[str], env: dict[str, str], log: Path) -> int:
    """Run a launcher with its output in `log`; wait for it. Its exit code."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its ranks go with it if this stage is stopped
        )
        try:
            return proc.wait()
        except BaseException:
            _stop_group(proc)
            raise


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the launcher and its ranks, SIGKILL to what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _log_losses(result: TrainResult) -> None:
    """The loss of each step, to the caller's active MLflow run (the launched processes have
    none: rank 0 of an in-process run logs them as it goes)."""
    mlflow = sys.modules.get("mlflow")
    active = mlflow.active_run() if mlflow is not None else None
    if active is None:
        return
    from fusellm.tracking import log_metrics

    first = result.steps - len(result.losses) + 1
    for step, loss in enumerate(result.losses, start=first):
        log_metrics({"loss": loss}, step=step, prefix="train", run_id=active.info.run_id)
