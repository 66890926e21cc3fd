"""`fusellm plan --gpus N --nodes M`: wall-clock hours per stage on M nodes x N GPUs per node, and
the bytes the shared work folder must hold, checked against figures worked out by hand.

The synthetic fusion: two distinct models of 1.8e9 parameters (the target, also source `a`, and
source `b`), 4e6 tokens, at 100 % MFU of 1 TFLOP/s, so that one GPU-hour is 3.6e15 FLOPs.
Extraction: 2 x 1.8e9 x 4e6 = 1.44e16 FLOPs = 4 GPU-hours a model, over 4e6 / (1024 - 24) =
4,000 full pieces in 4 shards of 1,000: 1 GPU-hour a shard. Training: 6 x 1.8e9 x 4e6 = 4.32e16
FLOPs = 12 GPU-hours a run, two runs (fused and CLM baseline).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fusellm.cli import app, estimates
from fusellm.cli.estimates import (
    FUSE_BYTES_PER_CPU_S,
    INTER_NODE_EFFICIENCY,
    PIECES_BYTES_PER_CPU_S,
    cluster_estimate,
    estimate,
    part_sizes,
    schedule_hours,
    training_efficiency,
)
from fusellm.cli.overrides import load_config

SYNTHETIC = {
    "target": {"uri": "models/a", "name": "a"},
    "sources": [{"uri": "models/a", "name": "a"}, {"uri": "models/b", "name": "b"}],
    "corpus": {"uri": "corpus"},
    "pieces": {"block_size": 1024, "margin": 24, "workers": 1},
    "extraction": {"top_k": 10, "token_ce": True, "shard_size": 1000},
    "fusion": {"workers": 1},
    "training": {"epochs": 1, "global_batch": 128, "micro_batch": 1, "keep_checkpoints": 2},
    "evaluation": {"suites": ["bbh", "commonsense"], "sources": True, "baseline": True},
    "planning": {"parameters": {"a": 1.8e9, "b": 1.8e9}, "corpus_tokens": 4e6},
}
TEXT = 4e6 * 4  # no local corpus: target tokens x 4 bytes
PIECES_H = TEXT / PIECES_BYTES_PER_CPU_S / 3600  # one worker
FUSE_H = TEXT / FUSE_BYTES_PER_CPU_S / 3600


@pytest.fixture
def config_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    path = tmp_path / "fusion.yaml"
    path.write_text(yaml.safe_dump(SYNTHETIC, sort_keys=False))
    return path


def _cluster(path: Path, nodes: int, gpus: int, *sets: str) -> dict:
    config = load_config(path, sets)
    figures = estimate(config, None, mfu=1.0, peak_tflops=1.0)
    return cluster_estimate(config, figures, None, nodes=nodes, gpus_per_node=gpus)


def _stages(cluster: dict) -> dict[str, dict]:
    return {f"{s['stage']} {s['what']}": s for s in cluster["stages"]}


# ---------------------------------------------------------------------------------------------
# The schedule


def test_units_spread_over_the_gpus_one_at_a_time():
    assert schedule_hours([1.0] * 4, 2) == (2.0, 2)  # 4 units of 1 GPU-hour on 2 GPUs: 2 hours
    assert schedule_hours([1.0] * 5, 2) == (3.0, 3)  # ceil(5 / 2) units one after the other
    assert schedule_hours([1.0] * 3, 8) == (1.0, 1)  # idle GPUs make no unit faster
    assert schedule_hours([3.0, 1.0, 1.0, 1.0], 2) == (3.0, 3)  # no faster than the longest unit
    assert schedule_hours([2.0, 2.0, 1.0, 1.0, 1.0, 1.0], 2) == (4.0, 3)  # = GPU-hours / GPUs
    assert schedule_hours([], 4) == (0.0, 0)
    with pytest.raises(ValueError, match="at least 1"):
        schedule_hours([1.0], 0)


def test_bounds_of_the_schedule():
    units = [0.5, 1.7, 0.2, 2.5, 0.9, 0.9, 1.1, 0.3, 0.4]
    for gpus in range(1, 12):
        wall, most = schedule_hours(units, gpus)
        assert wall >= max(sum(units) / gpus, max(units)) - 1e-12
        assert wall <= sum(units) / gpus + max(units)  # list scheduling's guarantee
        assert most >= len(units) / gpus


def test_parts_and_training_efficiency():
    assert part_sizes(4, 1) == [1, 1, 1, 1]
    assert part_sizes(5, 2) == [2, 2, 1]
    assert part_sizes(4, 3) == [3, 1]
    assert training_efficiency(1) == 1.0
    assert training_efficiency(2) == pytest.approx(INTER_NODE_EFFICIENCY)
    assert training_efficiency(4) == pytest.approx(INTER_NODE_EFFICIENCY**2)


# ---------------------------------------------------------------------------------------------
# A synthetic fusion, by hand


def test_wall_clock_per_stage_by_hand(config_path, monkeypatch):
    monkeypatch.setattr(estimates, "extraction_part_shards", lambda config: 1)
    two = _cluster(config_path, 2, 1)  # 2 nodes x 1 GPU
    stages = _stages(two)
    extract = stages["extract top-k stores, in parts"]
    assert extract["units"] == 8  # 2 models x 4 shards
    assert extract["gpu_hours"] == pytest.approx(8.0)
    assert extract["wall_hours"] == pytest.approx(4.0)  # 8 units of 1 GPU-hour on 2 GPUs
    fused, baseline = stages["train fused model (lam 0.9)"], stages["train CLM baseline (lam 1)"]
    for run in (fused, baseline):
        assert run["gpu_hours"] == pytest.approx(12.0)
        assert run["wall_hours"] == pytest.approx(12.0 / (2 * 0.9))  # 2 GPUs, across 2 nodes
    # CPU stages: the same hours whatever the GPUs
    assert stages["prepare pieces"]["wall_hours"] == pytest.approx(PIECES_H)
    assert stages["fuse align-and-fuse"]["wall_hours"] == pytest.approx(FUSE_H)
    evaluate = stages["evaluate 4 models x 2 suites"]  # fused, baseline, a, b
    assert evaluate["units"] == 8 and evaluate["wall_hours"] is None
    assert "4 rounds on 2 GPUs" in evaluate["how"]
    assert two["wall_hours"] == pytest.approx(PIECES_H + 4.0 + FUSE_H + 2 * 12.0 / 1.8)
    assert two["gpus"] == 2 and two["training_efficiency"] == pytest.approx(0.9)

    one = _stages(_cluster(config_path, 1, 2))  # the same 2 GPUs in one node: no network
    assert one["extract top-k stores, in parts"]["wall_hours"] == pytest.approx(4.0)
    assert one["train fused model (lam 0.9)"]["wall_hours"] == pytest.approx(6.0)

    big = _stages(_cluster(config_path, 2, 4))  # 8 GPUs: one shard each
    assert big["extract top-k stores, in parts"]["wall_hours"] == pytest.approx(1.0)
    assert big["prepare pieces"]["wall_hours"] == pytest.approx(PIECES_H)

    many = _stages(_cluster(config_path, 4, 4))  # 16 GPUs for 8 units: the longest unit
    assert many["extract top-k stores, in parts"]["wall_hours"] == pytest.approx(1.0)
    assert many["train fused model (lam 0.9)"]["wall_hours"] == pytest.approx(12 / (16 * 0.81))


def test_extraction_parts_group_shards(config_path, monkeypatch):
    """Parts of 3 shards: each model is a part of 3 GPU-hours and one of 1."""
    monkeypatch.setattr(estimates, "extraction_part_shards", lambda config: 3)
    for gpus, wall in ((1, 8.0), (2, 4.0), (4, 3.0), (8, 3.0)):
        extract = _stages(_cluster(config_path, 1, gpus))["extract top-k stores, in parts"]
        assert extract["units"] == 4
        assert extract["wall_hours"] == pytest.approx(wall), gpus


def test_shared_folder_by_hand(config_path):
    folder = _cluster(config_path, 2, 1)["shared_folder"]
    parts = {p["what"]: p["bytes"] for p in folder["parts"]}
    assert parts == pytest.approx(
        {
            "top-k stores": 2 * 4e6 * 25.5,  # 2 + 2.2 x 10 + 1.5 bytes a token
            "fused store": 4e6 * 24,
            "pieces": TEXT,
            "2 trained models": 2 * 1.8e9 * 2,  # bf16
            "3 checkpoints": 3 * 1.8e9 * 14,  # keep_checkpoints + 1, weights and AdamW state
        }
    )
    assert folder["bytes"] == pytest.approx(8.3116e10)


def test_notes_for_this_cluster(config_path):
    notes = _cluster(config_path, 3, 1)["notes"]
    assert any("global_batch 128 is not a multiple" in n and "1 x 3 GPUs" in n for n in notes)
    spans = getattr(load_config(config_path).training, "nodes", None)
    if spans is None:  # training on one machine's GPUs: the launcher's hostfile for more
        assert any("training on 3 nodes" in n for n in notes)
    else:
        assert any(n.startswith(f"training.nodes is {spans}:") for n in notes)
    assert any(n.startswith("execution is in-process") for n in notes)
    quiet = _cluster(config_path, 1, 2, "execution=deployments")["notes"]
    assert quiet == []


# ---------------------------------------------------------------------------------------------
# Through the command


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_plan_prints_the_cluster(config_path, tmp_path, monkeypatch):
    monkeypatch.setattr(estimates, "extraction_part_shards", lambda config: 1)
    common = [
        str(config_path),
        "--home",
        str(tmp_path / "home"),
        "--mfu",
        "1",
        "--peak-tflops",
        "1",
    ]
    plan = json.loads(_invoke("plan", *common, "--gpus", "1", "--nodes", "2", "--json").output)
    cluster = plan["estimate"]["cluster"]
    assert (cluster["nodes"], cluster["gpus_per_node"], cluster["gpus"]) == (2, 1, 2)
    walls = {s["stage"]: s["wall_hours"] for s in cluster["stages"]}
    assert walls["extract"] == pytest.approx(4.0)
    assert walls["train"] == pytest.approx(12.0 / 1.8)

    result = _invoke("plan", *common, "--gpus", "1", "--nodes", "2")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "2 nodes x 1 GPU per node = 2 GPUs" in text
    section = text.split("\non a cluster\n")[1].split("\n\n")[0].splitlines()
    lines = {line.split()[0]: line for line in section[2:]}
    assert lines["extract"].split()[5:8] == ["8", "8.0", "4.0"]  # units, GPU-h, wall-h
    assert "6.7  data parallel on 2 GPUs at 90% efficiency" in text
    assert f"{PIECES_H + 4 + FUSE_H + 2 * 12 / 1.8:.1f}  without evaluation" in text
    assert "shared work folder must hold 83.1 GB" in text

    alone = _invoke("plan", *common, "--gpus", "2")  # one node by default
    assert "1 node x 2 GPUs per node = 2 GPUs" in alone.output

    plain = _invoke("plan", *common)  # without --gpus: the plan as it always was
    assert plain.exit_code == 0 and "on a cluster" not in plain.output
    assert "cluster" not in json.loads(_invoke("plan", *common, "--json").output)["estimate"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0"], "error: --gpus 0: a node needs at least 1 GPU (--gpus is GPUs per node)"),
        (["--gpus", "-2"], "error: --gpus -2: a node needs at least 1 GPU"),
        (["--gpus", "8", "--nodes", "0"], "error: --nodes 0: a cluster needs at least 1 node"),
        (["--gpus", "8", "--nodes", "-1"], "error: --nodes -1: a cluster needs at least 1 node"),
        (["--nodes", "4"], "error: --nodes needs --gpus, the GPUs of each node"),
    ],
)
def test_cluster_errors(config_path, args, message):
    result = _invoke("plan", str(config_path), *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "stages" not in result.output  # nothing planned


def test_the_7b_example_in_the_docs_is_what_the_command_prints(tmp_path, monkeypatch):
    """Line for line, but for the extraction row's part count and description, which follow
    the size of a part (`extraction.shards_per_part`); its GPU-hours and wall-clock do not."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    sets = ["pieces.workers=64", "fusion.workers=64", "execution=deployments"]
    args = [str(repo / "configs" / "fusellm-7b.yaml"), "--gpus", "8", "--nodes", "4"]
    args += [a for s in sets for a in ("--set", s)]
    result = _invoke("plan", *args, "--home", str(tmp_path / "home"))
    assert result.exit_code == 0, result.output

    def block(text: str) -> list[str]:
        return text.split("\non a cluster\n")[1].split("\n\n")[0].splitlines()

    printed = block(result.output)
    documented = block("\n" + (repo / "docs" / "planning.md").read_text().split("```text\n")[1])
    assert len(printed) == len(documented)
    for mine, theirs in zip(printed, documented):
        if mine.startswith("  extract "):
            assert mine.split()[6:8] == theirs.split()[6:8] == ["50.9", "1.6"]
        else:
            assert mine == theirs
    total = "  total                                            153.1     5.7  without evaluation"
    assert total in printed
