"""The training stage on a machine with several GPUs: the DeepSpeed launcher, one process per
GPU, started from the stage's own process (a flow run on the GPU pool has only one).

Without a GPU: the stage is told the machine has two, and DeepSpeed's launcher runs its two
processes on the CPU (its CPU accelerator, gloo), as it would on two GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fusion_fixtures import tiny_fusion_config

from fusellm.stages import devices, pipeline
from fusellm.train.launch import (
    LaunchError,
    launch,
    launcher_command,
    processes_for,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_one_process_per_gpu_unless_a_launcher_started_this_one():
    assert processes_for(8, {}) == 8
    # The GPUs this process was given, by index: the launcher must not take GPUs 0..N-1.
    given = launcher_command(
        2, Path("c.yaml"), "m", "d", Path("o"), {"CUDA_VISIBLE_DEVICES": "4,5"}
    )
    assert given[given.index("--include") + 1] == "localhost:4,5" and "--num_gpus" not in given
    assert "--num_gpus" in launcher_command(8, Path("c.yaml"), "m", "d", Path("o"), {})
    assert processes_for(1, {}) == 1 and processes_for(0, {}) == 1
    assert processes_for(8, {"RANK": "0", "WORLD_SIZE": "8"}) == 1  # already one of the ranks


def test_training_stage_launches_one_process_per_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    config = tiny_fusion_config(tmp_path)
    training = config.training.model_copy(update={"max_steps": 4, "checkpoint_every": 2})
    config = config.model_copy(update={"training": training})
    done = pipeline.walk(config, pipeline.Executor(), until="align_fuse")
    monkeypatch.setattr(devices, "gpu_count", lambda: 2)

    trained = pipeline.walk(config, pipeline.Executor(), until="train").trained
    assert len(trained) == 2  # the fused model and the CLM baseline
    for artifact in trained.values():
        folder = artifact.path
        result = json.loads((folder / "result.json").read_text())
        assert result["steps"] == 4 and len(result["losses"]) == 4
        assert (folder / "model" / "model.safetensors").is_file()
        log = (folder / "launch.log").read_text()
        assert "dist_world_size=2" in log, log[-2000:]
        assert artifact.info["steps"] == 4
    assert done.fused_data is not None


def test_a_failed_launch_names_its_log(tmp_path, monkeypatch):
    from fusellm.train.config import TrainConfig

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    with pytest.raises(LaunchError, match=r"exited with code [1-9].*launch\.log"):
        launch(TrainConfig(max_steps=1), tmp_path / "no-model", tmp_path / "no-data",
               tmp_path / "out", processes=2)  # fmt: skip
    assert (tmp_path / "out" / "launch.log").is_file()


def test_the_result_record_round_trips(tmp_path):
    from fusellm.train.engine import TrainResult
    from fusellm.train.launch import read_result, write_result

    for model_dir in (tmp_path / "model", None):
        result = TrainResult(model_dir, steps=3, resumed_from=1, losses=[2.5, 2.0], tokens=40)
        write_result(result, tmp_path)
        assert read_result(tmp_path) == result
