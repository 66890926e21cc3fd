"""Training across nodes: one process group over several machines, torchrun's c10d rendezvous.

Two "machines" are two node processes on 127.0.0.1, one rank each (gloo, on the CPU), each
calling `fusellm.train.nodes.run_node` as a machine of the training stage does. Checked: their
weights equal bit for bit (torch.equal) those of one machine with two ranks under the DeepSpeed
launcher (the stage's path with two GPUs), with the same global batch; a node lost after a
checkpoint (its agent and rank SIGKILLed) and started again joins the same rendezvous id, and
the run resumes to the same weights; a node that cannot reach the rendezvous fails in its
timeout, naming the endpoint; the fields are validated, kept out of the stage key, and the
`train-node` flow checks and hands on its arguments. The stage end to end across two nodes:
`python -m fusellm.stages.nodes` (what a Kubernetes Job's pods run) on each, node 1's rank from
$JOB_COMPLETION_INDEX, node 0 finishing the stage folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import free_port, tiny_training_inputs, training_env, wait_listening

from fusellm.config import FusionConfigError, parse_fusion_config
from fusellm.stages.base import StageError
from fusellm.train.config import TrainConfig, TrainConfigError
from fusellm.train.nodes import NodeLaunchError, node_command, run_node

REPO = Path(__file__).resolve().parents[1]
CONFIG = {
    "global_batch": 8,
    "micro_batch": 2,
    "max_steps": 8,
    "learning_rate": 3e-3,
    "warmup_ratio": 0.1,
    "checkpoint_every": 4,
    "zero_stage": 2,
    "gradient_checkpointing": False,
    "max_length": 64,
    "seed": 7,
}
# One machine: `run_node` as the training stage calls it; prints the result as JSON.
NODE = """
import json, sys
from fusellm.train.config import TrainConfig
from fusellm.train.nodes import run_node

a = json.loads(sys.argv[1])
result = run_node(TrainConfig(**a["config"]), a["model"], a["data"], a["output"],
                  node_rank=a["node_rank"], run_id=a["run_id"], nodes=2, rendezvous=a["rendezvous"],
                  local_addr="127.0.0.1", timeout_s=120, entry=a["entry"])
print(json.dumps(None if result is None else {"steps": result.steps, "losses": result.losses,
                                              "resumed_from": result.resumed_from}))
"""
# `python -m fusellm.train` on a machine that is lost after the checkpoint of step $KILL_NODE_AT:
# its rank kills its node's torchrun agent, then itself (SIGKILL: no cleanup of any kind).
LOST = """
import os, signal
from fusellm.train import engine

_train, KILL_AT = engine.train, int(os.environ["KILL_NODE_AT"])

def lose_the_node(step, metrics, saved):
    if saved is not None and step == KILL_AT:
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

engine.train = lambda *args, **kwargs: _train(*args, on_step=lose_the_node, **kwargs)

from fusellm.train.cli import main

main()
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The tiny target, a fused store for it, and the node scripts."""
    root = tiny_training_inputs(tmp_path_factory.mktemp("nodes"))
    (root / "node.py").write_text(NODE)
    (root / "lost.py").write_text(LOST)
    return root


@pytest.fixture(scope="module")
def one_machine(root, tmp_path_factory):
    """The reference: one machine, two ranks, the DeepSpeed launcher (the stage's own path on a
    machine with two GPUs), the same global batch."""
    from fusellm.train.launch import launch

    out = tmp_path_factory.mktemp("one-machine") / "out"
    old = os.environ.copy()
    os.environ.update(training_env())
    try:
        launch(TrainConfig(**CONFIG), root / "model", root / "data", out, processes=2)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return out


class Node:
    """One machine: a process calling `run_node`, in a process group of its own."""

    def __init__(self, root: Path, rank: int, output: Path, port: int, lost_at: int | None = None):
        self.log = output.parent / f"node{rank}-{'lost' if lost_at else 'whole'}.log"
        args = {
            "config": CONFIG,
            "model": str(root / "model"),
            "data": str(root / "data"),
            "output": str(output),
            "node_rank": rank,
            "run_id": "nodes-test",
            "rendezvous": f"127.0.0.1:{port}",
            "entry": [str(root / "lost.py")] if lost_at else ["-m", "fusellm.train"],
        }
        env = training_env(KILL_NODE_AT=str(lost_at)) if lost_at else training_env()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(root / "node.py"), json.dumps(args)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait(self, timeout: float = 400) -> int:
        return self.proc.wait(timeout=timeout)

    def result(self):
        return json.loads(self.log.read_text().strip().splitlines()[-1])

    def stop(self) -> None:
        """SIGINT first: `run_node` then stops its agent, which stops its rank."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _start_two(root, output, port, *, lost_at=None) -> tuple[Node, Node]:
    """Node 0 first: it hosts the rendezvous (both are on 127.0.0.1; the second to bind the port
    takes the first's store, as torchrun does for agents on one machine)."""
    node0 = Node(root, 0, output, port)
    wait_listening(port, node0.proc, 120, node0.log, name="node 0's rendezvous")
    return node0, Node(root, 1, output, port, lost_at)


def _ok(node: Node) -> None:
    assert node.wait() == 0, node.log.read_text()[-4000:]


def _assert_equal_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_end_bit_for_bit_where_one_machine_does(root, one_machine, tmp_path):
    out = tmp_path / "out"
    nodes = _start_two(root, out, free_port())
    try:
        for node in nodes:
            _ok(node)
    finally:
        for node in nodes:
            node.stop()
    _assert_equal_weights(one_machine / "model", out / "model")
    reference = json.loads((one_machine / "result.json").read_text())
    result = nodes[0].result()
    assert result["steps"] == 8 and result["losses"] == reference["losses"]
    assert nodes[1].result() is None  # node 1 reads nothing back
    # Node 1 wrote nothing but its ranks' part of the checkpoints: node 0's log and config,
    # and what global rank 0 wrote, wherever it ran.
    assert {p.name for p in out.iterdir()} == {
        "checkpoints", "launch.log", "model", "result.json", "train-config.yaml",
    }  # fmt: skip
    assert {p.name for p in (out / "checkpoints" / "step-00000008").glob("rng-rank*.pt")} == {
        "rng-rank0.pt", "rng-rank1.pt",
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_node_started_again_resumes_to_the_same_weights(root, one_machine, tmp_path):
    """Node 1 is lost right after the checkpoint of step 4; node 0's rank fails at its next
    collective, its agent restarts it and waits in the rendezvous; node 1 started again joins
    the same rendezvous id, and both resume from step 4."""
    out, port = tmp_path / "out", free_port()
    node0, lost = _start_two(root, out, port, lost_at=4)
    again = None
    try:
        assert lost.wait() != 0, "the lost node must not finish"
        assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
        assert not (out / "model").exists()
        again = Node(root, 1, out, port)
        _ok(again)
        _ok(node0)
    finally:
        for node in (node0, lost, again):
            if node is not None:
                node.stop()
    assert node0.result()["resumed_from"] == 4
    _assert_equal_weights(one_machine / "model", out / "model")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("host", [False, None], ids=["unreachable", "alone"])
def test_a_node_that_cannot_join_the_rendezvous_names_the_endpoint(root, tmp_path, host):
    """Unreachable: nothing listens at the endpoint. Alone: this node hosts the rendezvous, and
    the other never comes. Either way the error comes within the timeout and names where."""
    endpoint = f"127.0.0.1:{free_port()}"
    old = os.environ.copy()
    os.environ.update(training_env())
    try:
        with pytest.raises(NodeLaunchError) as caught:
            run_node(
                TrainConfig(**CONFIG), root / "model", root / "data", tmp_path / "out",
                node_rank=1, run_id="nobody-comes", nodes=2, rendezvous=endpoint,
                timeout_s=3, host=host,
            )  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(old)
    message = str(caught.value)
    assert f"could not join the rendezvous at {endpoint} within 3 s" in message, message
    assert "node 1 of 2" in message
    assert not (tmp_path / "out" / "launch.log").exists()  # node 1 keeps its log to itself


def test_the_fields_are_checked_and_the_errors_name_them():
    base = {
        "target": {"uri": "/models/a"},
        "sources": [{"uri": "/models/a"}, {"uri": "/models/b"}],
        "corpus": {"uri": "/corpus"},
    }
    cases = {
        "training.rendezvous: required when nodes > 1": {"nodes": 2},
        "training.rendezvous: 'train-0' is not host:port": {"nodes": 2, "rendezvous": "train-0"},
        "training.rendezvous: 'h:70000': port 70000": {"nodes": 2, "rendezvous": "h:70000"},
        "training.nodes: Input should be greater than or equal to 1": {"nodes": 0},
        "training.rendezvous_timeout": {"rendezvous_timeout": 0},
    }
    for expected, training in cases.items():
        with pytest.raises(FusionConfigError) as caught:
            parse_fusion_config({**base, "training": training}, source="fusion.yaml")
        assert f"fusion.yaml: {expected}" in str(caught.value)
    config = parse_fusion_config(
        {**base, "training": {"nodes": 4, "rendezvous": "[fd00::1]:29400"}}
    )
    assert config.training.nodes == 4 and TrainConfig().nodes == 1
    for kwargs, field in [
        ({"node_rank": 2, "nodes": 2}, "node_rank: 2 is not a node of 2"),
        ({"node_rank": -1, "nodes": 2}, "node_rank: -1"),
        ({"node_rank": 0, "nodes": 2, "rendezvous": "nowhere"}, "rendezvous: 'nowhere'"),
        ({"node_rank": 0, "nodes": 2, "processes": 0}, "processes: 0"),
    ]:
        kwargs.setdefault("rendezvous", "127.0.0.1:29400")
        with pytest.raises(TrainConfigError, match=field):
            run_node(TrainConfig(), "m", "d", "o", run_id="x", **kwargs)


def test_the_agent_is_torchrun_with_the_c10d_rendezvous():
    cmd = node_command(
        Path("c.yaml"), "m", "d", Path("o"),
        nodes=4, node_rank=2, rendezvous="train-0.example:29400", run_id="key",
        processes=8, timeout_s=900, local_addr="10.0.0.3",
    )  # fmt: skip
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    joined = " ".join(cmd)
    for part in (
        "--nnodes 4 --nproc-per-node 8",
        "--rdzv-backend c10d --rdzv-endpoint train-0.example:29400 --rdzv-id key",
        "--rdzv-conf join_timeout=900,read_timeout=900 ",
        "--local-addr 10.0.0.3",
        "-m fusellm.train c.yaml --model m --data d --output o",
    ):
        assert part in joined, joined
    assert "is_host=0" in " ".join(node_command(
        Path("c.yaml"), "m", "d", Path("o"), nodes=2, node_rank=1, rendezvous="h:1",
        run_id="k", processes=1, timeout_s=5, host=False,
    ))  # fmt: skip


def test_nodes_and_the_rendezvous_are_not_in_the_stage_key(tmp_path):
    """Scheduling, like the micro batch: N machines of G GPUs train what one of N x G does.
    (tests/test_stage_keys.py lists the fields; a config with nodes > 1 needs its endpoint.)"""
    from fusellm.io.sources import ModelRef
    from fusellm.stages.base import Artifact, ModelFiles
    from fusellm.stages.training import SCHEDULING_FIELDS, train_key

    assert {"nodes", "rendezvous", "rendezvous_timeout"} <= SCHEDULING_FIELDS
    base = {
        "target": {"uri": "/models/a"},
        "sources": [{"uri": "/models/a"}, {"uri": "/models/b"}],
        "corpus": {"uri": "/corpus"},
    }
    target = ModelFiles("a", ModelRef(uri="/models/a"), tmp_path, "id-a", "tok-a")
    data, pieces = Artifact("fused", "k-fused", tmp_path), Artifact("pieces", "k-p", tmp_path)
    one = parse_fusion_config(base)
    four = parse_fusion_config(
        {**base, "training": {"nodes": 4, "rendezvous": "h:1", "rendezvous_timeout": 60}}
    )
    for baseline in (False, True):
        assert train_key(target, data, pieces, one, baseline=baseline) == train_key(
            target, data, pieces, four, baseline=baseline
        )


def test_the_train_node_flow_checks_and_hands_on_its_arguments(monkeypatch):
    """The flow is thin: it refuses a label or node rank the config does not have before it
    walks anything, walks to align_fuse, and hands the node to `training.train_node`."""
    from fusellm.stages import pipeline, training
    from fusellm_flows import stages as flows

    base = {
        "target": {"uri": "/models/a"},
        "sources": [{"uri": "/models/a"}, {"uri": "/models/b"}],
        "corpus": {"uri": "/corpus"},
        "training": {"nodes": 2, "rendezvous": "127.0.0.1:29400"},
    }
    config = parse_fusion_config(base)
    walked, handed = [], []
    monkeypatch.setattr(pipeline, "walk", lambda c, ex, until: walked.append(until) or "fusion")

    def node(f, ex, label, node_rank):
        handed.append((f, type(ex).__name__, label, node_rank))
        return {"label": label, "node_rank": node_rank}

    monkeypatch.setattr(training, "train_node", node)
    for label, rank, error in [
        ("bogus", 0, "label: 'bogus' names no training"),
        ("fused", 2, "node_rank: 2 is not a node of training.nodes = 2"),
        ("fused", -1, "node_rank: -1"),
    ]:
        with pytest.raises(StageError, match=error):
            flows.train_node.fn(config, label, rank)
    no_baseline = parse_fusion_config({**base, "evaluation": {"baseline": False}})
    with pytest.raises(StageError, match="evaluation.baseline is false"):
        flows.train_node.fn(no_baseline, "baseline", 1)
    assert walked == [] and handed == []

    out = flows.train_node.fn(config, "baseline", 1)
    assert walked == ["align_fuse"]
    assert handed == [("fusion", "PrefectExecutor", "baseline", 1)]
    assert out["label"] == "baseline" and out["node_rank"] == 1 and "states" in out


def test_the_node_command_takes_its_rank_from_the_indexed_job():
    from fusellm.stages.nodes import node_rank_from

    assert node_rank_from(None, {"JOB_COMPLETION_INDEX": "3"}) == 3
    assert node_rank_from(1, {"JOB_COMPLETION_INDEX": "3"}) == 1
    with pytest.raises(ValueError, match="--node-rank"):
        node_rank_from(None, {})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_training_stage_across_two_nodes(tmp_path):
    """`python -m fusellm.stages.nodes CONFIG` on two "machines": node 0 builds the stage folder
    under its lock, node 1 (rank from $JOB_COMPLETION_INDEX) joins it; the folder is finished
    as on one machine, and the pipeline then finds it done."""
    import yaml
    from fusion_fixtures import fusion_dict, tiny_inputs

    from fusellm.stages import pipeline

    port = free_port()
    models, corpus = tiny_inputs(tmp_path)
    data = fusion_dict(models, str(corpus), tmp_path / "work", "sqlite:///unused.db")
    data["extraction"]["shard_size"] = 8
    data["training"].update(
        max_steps=4, checkpoint_every=2, nodes=2, rendezvous=f"127.0.0.1:{port}"
    )
    data["evaluation"]["baseline"] = False  # one training: the fused model
    config_file = tmp_path / "fusion.yaml"
    config_file.write_text(yaml.safe_dump(data))
    config = parse_fusion_config(data)
    pipeline.walk(config, pipeline.Executor(), until="align_fuse")  # done before the nodes start

    def start(rank_arg: list[str], env: dict, name: str):
        log = tmp_path / f"{name}.log"
        cmd = [sys.executable, "-m", "fusellm.stages.nodes", str(config_file),
               *rank_arg, "--local-addr", "127.0.0.1"]  # fmt: skip
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return proc, log

    node0, log0 = start(["--node-rank", "0"], training_env(), "node0")
    procs = [node0]
    try:
        wait_listening(port, node0, 300, log0, name="node 0's rendezvous")
        node1, log1 = start([], training_env(JOB_COMPLETION_INDEX="1"), "node1")
        procs.append(node1)
        for proc, log in ((node0, log0), (node1, log1)):
            assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=60)
    said = [json.loads(log.read_text().strip().splitlines()[-1]) for log in (log0, log1)]
    assert [s["node_rank"] for s in said] == [0, 1] and said[0]["key"] == said[1]["key"]
    folder = tmp_path / "work" / "train" / said[0]["key"]
    assert said[0]["model"] == str(folder / "model") and said[1]["model"] is None
    info = json.loads((folder / "stage.json").read_text())["info"]
    assert info["steps"] == 4 and len(info["losses"]) == 4
    assert (folder / "model" / "model.safetensors").is_file()
    assert {p.name for p in folder.iterdir()} == {
        "launch.log", "model", "result.json", "stage.json", "train-config.yaml",
    }  # fmt: skip
    assert not list((tmp_path / "work" / "train").glob(".*.partial"))
    trained = pipeline.walk(config, pipeline.Executor(), until="train").trained
    assert set(trained) == {"fused"} and trained["fused"].reused
    assert trained["fused"].path == folder
