"""Checkpoints: the `latest` pointer, pruning, refusing resumes that cannot be exact."""

from __future__ import annotations

import json

import pytest

from fusellm.train.checkpoint import (
    LATEST,
    STATE,
    SUMS,
    TAG,
    _prune,
    checkpoint_name,
    file_sums,
    latest_checkpoint,
)
from fusellm.train.config import TrainConfig, TrainConfigError
from fusellm.train.engine import check_resume, deepspeed_config


def _fake_checkpoint(root, step, config: TrainConfig, world_size=1):
    path = root / checkpoint_name(step)
    (path / TAG).mkdir(parents=True)
    state = {"step": step, "world_size": world_size, "config": config.model_dump(mode="json")}
    (path / STATE).write_text(json.dumps(state))
    (path / TAG / "model_states.pt").write_bytes(bytes(range(256)) * step)
    (path / SUMS).write_text(json.dumps(file_sums(path)))
    (root / LATEST).write_text(path.name + "\n")
    return path


def test_latest_pointer(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    cfg = TrainConfig(global_batch=8, micro_batch=2)
    first = _fake_checkpoint(tmp_path, 4, cfg)
    assert latest_checkpoint(tmp_path) == first
    (tmp_path / LATEST).write_text("step-00000099\n")  # names a folder that is gone
    assert latest_checkpoint(tmp_path) == first  # passed over for the newest intact one
    (tmp_path / LATEST).write_text("not-a-step\n")
    with pytest.raises(RuntimeError, match=r"latest: names 'not-a-step'"):
        latest_checkpoint(tmp_path)


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_a_damaged_checkpoint_is_passed_over_for_an_earlier_intact_one(tmp_path, how, caplog):
    cfg = TrainConfig(global_batch=8, micro_batch=2)
    first, second, third = (_fake_checkpoint(tmp_path, s, cfg) for s in (4, 8, 12))
    victim = third / TAG / "model_states.pt"
    data = bytearray(victim.read_bytes())
    if how == "flip":
        data[100] ^= 0x01
        victim.write_bytes(bytes(data))
    elif how == "truncate":
        victim.write_bytes(bytes(data[:-1]))
    else:
        victim.unlink()
    assert latest_checkpoint(tmp_path) == second
    assert "model_states.pt" in caplog.text and str(third) in caplog.text
    (second / STATE).unlink()  # damaged too, its state missing: back to the first
    assert latest_checkpoint(tmp_path) == first
    (first / SUMS).write_text("not json")
    assert latest_checkpoint(tmp_path) is None  # nothing intact: start over
    assert "starts over" in caplog.text


def test_prune_keeps_the_newest_and_drops_dead_saves(tmp_path):
    cfg = TrainConfig(global_batch=8, micro_batch=2)
    for step in (4, 8, 12):
        _fake_checkpoint(tmp_path, step, cfg)
    (tmp_path / ".tmp-step-00000016").mkdir()
    _prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-00000008", "step-00000012"]


def test_a_save_after_a_fallback_drops_the_checkpoints_passed_over(tmp_path):
    """Resumed from step 4 past a damaged step 12: the save of step 8 removes step 12, which
    would otherwise outrank it and have it pruned (leaving `latest` naming nothing)."""
    cfg = TrainConfig(global_batch=8, micro_batch=2)
    for step in (4, 12):
        _fake_checkpoint(tmp_path, step, cfg)
    _fake_checkpoint(tmp_path, 8, cfg)  # the save that followed the fallback
    _prune(tmp_path, keep=1, newest="step-00000008")
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-00000008"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000008"


def test_resume_refuses_other_world_size_or_changed_config(tmp_path):
    cfg = TrainConfig(global_batch=8, micro_batch=2, learning_rate=1e-3)
    ckpt = _fake_checkpoint(tmp_path, 8, cfg, world_size=2)
    assert check_resume(ckpt, cfg, 2) == 8
    # bookkeeping fields may change without changing the trajectory
    assert check_resume(ckpt, cfg.model_copy(update={"checkpoint_every": 3}), 2) == 8
    with pytest.raises(TrainConfigError, match=r"written by 2 ranks, this run has 1"):
        check_resume(ckpt, cfg, 1)
    with pytest.raises(TrainConfigError, match=r"learning_rate: 0.001 -> 0.002"):
        check_resume(ckpt, cfg.model_copy(update={"learning_rate": 2e-3}), 2)


def test_deepspeed_config_follows_the_fields():
    cfg = TrainConfig(
        global_batch=16,
        micro_batch=2,
        zero_stage=3,
        max_grad_norm=0.5,
        bf16=False,
        deepspeed={"zero_optimization": {"overlap_comm": True}},
    )
    ds = deepspeed_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (16, 2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["bf16"] == {"enabled": False} and "optimizer" not in ds
    ds = deepspeed_config(cfg.model_copy(update={"optimizer": "deepspeed"}), world_size=1)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
