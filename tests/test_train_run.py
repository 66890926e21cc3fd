"""End-to-end training under DeepSpeed on CPU with tiny models.

One process and two (torchrun): the fusion loss goes down, a SIGKILL after a checkpoint plus a
resume ends with weights equal (torch.equal) to an uninterrupted run, and the CLM baseline
(lam = 1) runs through the same code, logging into an active MLflow run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import free_port, tiny_training_inputs, training_env

from fusellm.data.store import open_topk
from fusellm.method.loss import fusion_loss_parts
from fusellm.train.collator import collate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
CONFIG = {
    "global_batch": 8,
    "micro_batch": 2,
    "max_steps": 12,
    "learning_rate": 3e-3,
    "warmup_ratio": 0.1,
    "checkpoint_every": 4,
    "keep_checkpoints": 2,
    "zero_stage": 2,
    "max_length": 64,
    "seed": 7,
}
WORKER = """
import json, os, signal, sys
from fusellm.train import train

args = json.loads(sys.argv[1])

def stop_hard(step, metrics, saved):
    if saved is not None and step == args["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as in a crash

train(args["config"], args["model"], args["data"], args["output"], on_step=stop_hard)
"""


def _launch(procs: int, *args: str) -> subprocess.CompletedProcess:
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(procs),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            *args,
        ]
    return subprocess.run(
        cmd, env=training_env(), capture_output=True, text=True, timeout=420, check=False
    )


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tiny_training_inputs(tmp_path_factory.mktemp("train"))
    (root / "worker.py").write_text(WORKER)
    return root


def _config(root: Path, name: str, **fields) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(json.dumps({**CONFIG, **fields}))  # JSON is YAML
    return path


def _worker(root, procs, output, kill_at=None, **fields) -> subprocess.CompletedProcess:
    args = {
        "config": str(_config(root, Path(output).name, **fields)),
        "model": str(root / "model"),
        "data": str(root / "data"),
        "output": str(output),
        "kill_at": kill_at,
    }
    return _launch(procs, str(root / "worker.py"), json.dumps(args))


def _cli(root, procs, output, **fields) -> subprocess.CompletedProcess:
    cfg = _config(root, Path(output).name, **fields)
    return _launch(
        procs,
        "-m",
        "fusellm.train",
        str(cfg),
        "--model",
        str(root / "model"),
        "--data",
        str(root / "data"),
        "--output",
        str(output),
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def _weights(model_dir: Path) -> dict:
    return load_file(model_dir / "model.safetensors")


def _assert_equal_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _data_loss(model_dir: Path, data_dir: Path) -> float:
    """The fusion objective of a saved model over the whole store, computed independently."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = collate(list(open_topk(data_dir)), pad_id=0, max_length=64)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return fusion_loss_parts(
            logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"], lam=0.9
        )[0].item()


def _kill_and_resume(root: Path, procs: int, reference: Path, out: Path) -> None:
    killed = _worker(root, procs, out, kill_at=8, gradient_checkpointing=procs == 1)
    if procs == 1:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    else:
        assert killed.returncode != 0, "the killed run must not finish"
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000008"
    assert not (out / "model").exists()
    # a save that died half-way leaves a temporary folder: resuming must ignore it
    junk = ckpts / ".tmp-step-00000012" / "ds"
    junk.mkdir(parents=True)
    (junk / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    # and the newest checkpoint was damaged on disk: resuming passes over it to step 4
    victim = max(
        (p for p in (ckpts / "step-00000008").rglob("*.pt")), key=lambda p: p.stat().st_size
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    resumed = _cli(root, procs, out, gradient_checkpointing=procs == 1)
    _ok(resumed)
    assert f"{victim.name} does not match its sha256" in resumed.stdout + resumed.stderr
    _assert_equal_weights(reference / "model", out / "model")
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000008", "step-00000012"]


def test_one_process_fusion_zero2_trains_and_resumes_exactly(fixture, tmp_path):
    root = fixture
    ref = tmp_path / "uninterrupted"
    _ok(_cli(root, 1, ref, gradient_checkpointing=True))
    model = ref / "model"
    assert (model / "model.safetensors").exists() and not list(model.glob("*.bin"))
    assert (model / "tokenizer.json").exists()
    card = (model / "README.md").read_text()
    for expected in (
        "FuseLLM knowledge fusion",
        "llama-src",
        "mpt-src",
        "lam: 0.9",
        "fusellm 0.1.0",
        "zero_stage: 2",
        str(root / "model"),
    ):
        assert expected in card, expected
    before, after = _data_loss(root / "model", root / "data"), _data_loss(model, root / "data")
    assert after < before - 0.3, (before, after)
    _kill_and_resume(root, 1, ref, tmp_path / "killed")


@pytest.fixture(scope="module")
def two_process_run(fixture, tmp_path_factory):
    """An uninterrupted ZeRO-2 run under torchrun with two processes."""
    ref = tmp_path_factory.mktemp("two") / "uninterrupted2"
    _ok(_worker(fixture, 2, ref))
    return ref


def test_two_processes_fusion_zero2_trains_and_resumes_exactly(fixture, two_process_run, tmp_path):
    root, ref = fixture, two_process_run
    before, after = (
        _data_loss(root / "model", root / "data"),
        _data_loss(ref / "model", root / "data"),
    )
    assert after < before - 0.3, (before, after)
    ckpt = ref / "checkpoints" / "step-00000012"
    assert {p.name for p in ckpt.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    _kill_and_resume(root, 2, ref, tmp_path / "killed2")


def test_zero3_under_the_deepspeed_launcher(fixture, two_process_run, tmp_path):
    """`deepspeed --module fusellm.train` (it adds --local_rank), ZeRO-3 sharding the weights:
    the saved model is whole and matches the ZeRO-2 run up to float summation order."""
    root, out = fixture, tmp_path / "zero3"
    cfg = _config(root, "zero3", zero_stage=3, gradient_checkpointing=False)
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [
        str(launcher),
        "--num_gpus",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--module",
        "fusellm.train",
        str(cfg),
        "--model",
        str(root / "model"),
        "--data",
        str(root / "data"),
        "--output",
        str(out),
    ]
    _ok(
        subprocess.run(
            cmd, env=training_env(), capture_output=True, text=True, timeout=420, check=False
        )
    )
    zero3, zero2 = _weights(out / "model"), _weights(two_process_run / "model")
    assert zero3.keys() == zero2.keys()
    for name, tensor in zero3.items():
        assert tensor.shape == zero2[name].shape, name
        torch.testing.assert_close(tensor, zero2[name], rtol=1e-4, atol=1e-5)


def test_clm_baseline_in_process_logs_to_active_mlflow_run(fixture, tmp_path, monkeypatch):
    """lam = 1 runs the same loop without top-k tensors; metrics land in the caller's run."""
    import mlflow

    for key, value in training_env().items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    from fusellm.train import train

    root = fixture
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = {**CONFIG, "lam": 1.0, "max_steps": 6, "checkpoint_every": 100, "zero_stage": 1}
    try:
        with mlflow.start_run() as run:
            result = train(cfg, root / "model", root / "data", tmp_path / "clm")
    finally:
        mlflow.set_tracking_uri(None)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert result.model_dir == tmp_path / "clm" / "model" and result.steps == 6
    assert result.losses[-1] < result.losses[0] - 0.2, result.losses
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = {
        m: client.get_metric_history(run.info.run_id, f"train/{m}")
        for m in ("loss", "clm_loss", "fusion_loss", "learning_rate", "grad_norm", "tokens_per_s")
    }
    # The total loss is the stage record's (the fusion logs it once from there); the parts and
    # the optimizer's numbers are logged live, one value per step.
    assert history.pop("loss") == []
    assert all(len(h) == 6 for h in history.values())
    assert [m.value for m in history["clm_loss"]] == pytest.approx(result.losses)  # lam = 1
    assert all(m.value == 0 for m in history["fusion_loss"])
    assert all(m.value > 0 for m in history["tokens_per_s"] + history["grad_norm"])
    assert "CLM continual training (baseline)" in (result.model_dir / "README.md").read_text()
    # only the final step writes a checkpoint when checkpoint_every exceeds the run
    assert (tmp_path / "clm" / "checkpoints" / "latest").read_text().strip() == "step-00000006"
