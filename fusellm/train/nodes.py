"""Training across machines: one process group over N nodes, joined by torchrun's rendezvous.

Each node starts torchrun's agent (`python -m torch.distributed.run`) with the same rendezvous
endpoint and id; the agents meet in the c10d rendezvous that the agent on the endpoint's machine
hosts at `host:port` (one of the N nodes must run there: node 0 where it can be arranged), and
start one worker per GPU of their machine (`--nproc-per-node`): together one process group of
N x G ranks, in which each worker runs `python -m fusellm.train` and DeepSpeed initialises as
it would under any launcher. The run is the run of one machine with N x G GPUs: the same data
order, the same global batch, the same weights (`tests/test_training_nodes.py`: two nodes of
one rank each end bit for bit where one machine with two ranks does).

Every node trains into the same output folder on a shared filesystem (the stage's partial
folder): the ranks of every node write their part of each checkpoint there (their ZeRO
partitions and RNG states, `fusellm.train.checkpoint`), and global rank 0, on whichever node
the rendezvous placed it, writes the model and `result.json`. Node 0 keeps its agent's log
(`launch.log`) and config there too; the other nodes keep theirs in a temporary folder of their
own machine, named in the error when they fail, and write nothing else.

A lost node: the others' workers fail at their next collective, their agents restart them
(`max_restarts`) and wait in the rendezvous, up to the rendezvous timeout, for a node to take
the lost one's place; the node started again (a retried flow run, the Job's pod of that index)
joins with the same id, and every rank resumes from the latest checkpoint, as one machine does.
Losing the machine that hosts the rendezvous store ends the run on every node; so does a node
that is not replaced within the timeout, or a node lost with no restarts left. Starting all N
again with the same id then resumes from the latest checkpoint too.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from fusellm.train.config import TrainConfig, TrainConfigError, split_endpoint
from fusellm.train.launch import (
    LOG_TAIL_CHARS,
    RESULT_FILE,
    LaunchError,
    _log_losses,
    read_result,
    run_logged,
)

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # restarts of a node's workers when a rank fails (a node lost, then replaced)
ENTRY = ("-m", "fusellm.train")
# The launcher variables of a process that is itself a rank: never handed on to an agent.
RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)
_RENDEZVOUS_FAILURES = re.compile(
    r"Rendezvous(Timeout|Connection|Closed|State)Error|connection to the C10d store has failed"
)


class NodeLaunchError(LaunchError):
    """This node's part of a training across nodes failed: says which node, the rendezvous
    endpoint and id, and where its log is."""


def check_node(nodes: int, node_rank: int, rendezvous: str | None) -> str:
    """The endpoint of a valid node of `nodes`; errors name the field at fault."""
    if nodes < 1:
        raise TrainConfigError(f"nodes: {nodes}; a training runs on at least 1 node")
    if not 0 <= node_rank < nodes:
        raise TrainConfigError(
            f"node_rank: {node_rank} is not a node of {nodes} (expected 0 to {nodes - 1})"
        )
    if not rendezvous:
        raise TrainConfigError(
            "rendezvous: required for a training across nodes: host:port of node 0's machine"
        )
    try:
        split_endpoint(rendezvous)
    except ValueError as err:
        raise TrainConfigError(f"rendezvous: {err}") from None
    return rendezvous.strip()


def node_command(
    config_file: Path,
    model,
    data,
    output: Path,
    *,
    nodes: int,
    node_rank: int,
    rendezvous: str,
    run_id: str,
    processes: int,
    timeout_s: int,
    max_restarts: int = MAX_RESTARTS,
    local_addr: str | None = None,
    host: bool | None = None,
    entry: Sequence[str] = ENTRY,
) -> list[str]:
    """This node's torchrun agent: N nodes of `processes` ranks meeting at `rendezvous`.

    The agent on the machine the endpoint names hosts the rendezvous store (torchrun compares
    the endpoint with its host names and addresses; `host` says it outright), whatever its
    `node_rank`; if several agents run there, the first hosts it. The ranks torchrun gives the
    nodes follow the order of their addresses, not `node_rank`.
    """
    conf = f"join_timeout={timeout_s},read_timeout={timeout_s}"
    if host is not None:
        conf += f",is_host={int(host)}"
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nodes), "--nproc-per-node", str(processes),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous, "--rdzv-id", run_id,
        "--rdzv-conf", conf, "--max-restarts", str(max_restarts),
        *(["--local-addr", local_addr] if local_addr else []),
        *entry, str(config_file),
        "--model", str(model), "--data", str(data), "--output", str(output),
    ]  # fmt: skip


def run_node(
    config: TrainConfig,
    model,
    data,
    output: str | os.PathLike,
    *,
    node_rank: int,
    run_id: str,
    processes: int = 1,
    nodes: int | None = None,
    rendezvous: str | None = None,
    timeout_s: int | None = None,
    max_restarts: int = MAX_RESTARTS,
    local_addr: str | None = None,
    host: bool | None = None,
    entry: Sequence[str] = ENTRY,
):
    """Run this node's part of a training across nodes; wait for the whole run to end.

    `nodes`, `rendezvous` and `timeout_s` default to the config's `nodes`, `rendezvous` and
    `rendezvous_timeout`. `run_id` names the rendezvous: every node of one run passes the same
    (the stage key), and a run started again with it resumes from the latest checkpoint in
    `output`. `processes`: ranks on this node (its GPUs; 1 on a CPU). `local_addr`: the address
    the other nodes reach this one by (default: its fully qualified host name). `host`: whether
    this node hosts the rendezvous (default: the node on the endpoint's machine does).
    `node_rank` says which node keeps the agent's log and config in `output` and reads the
    result back: node 0, which builds the stage folder; it need not be the rendezvous host.

    Returns the TrainResult on node 0 (read from `output/result.json`, which global rank 0
    writes), None on the others. Raises NodeLaunchError naming the endpoint when this node could
    not join the rendezvous in time, or naming its log when the training failed.
    """
    from fusellm.io.files import write_text_atomic

    nodes = config.nodes if nodes is None else nodes
    endpoint = check_node(nodes, node_rank, config.rendezvous if rendezvous is None else rendezvous)
    timeout_s = config.rendezvous_timeout if timeout_s is None else timeout_s
    if processes < 1:
        raise TrainConfigError(f"processes: {processes}; a node runs at least 1 rank")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # Node 0 keeps its config and log in the output folder; the others keep theirs to themselves.
    own = output if node_rank == 0 else Path(tempfile.mkdtemp(prefix=f"fusellm-node{node_rank}-"))
    config_file = write_text_atomic(
        own / "train-config.yaml", yaml.safe_dump(config.model_dump(mode="json"))
    )
    if node_rank == 0:
        # No rank writes before every agent joined, node 0's too: this cannot remove a new one.
        (output / RESULT_FILE).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    # Each round of the rendezvous publishes where its rank 0 listens. With the store shared
    # (torch's default) a surviving rank 0 skips that in a later round, and a node joining in
    # place of a lost one waits for it until the timeout (seen with torch 2.13; the sharing is
    # known not to suit restarts: pytorch/pytorch#135712).
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    agent_log = own / "launch.log"
    command = node_command(
        config_file, model, data, output,
        nodes=nodes, node_rank=node_rank, rendezvous=endpoint, run_id=run_id,
        processes=processes, timeout_s=timeout_s, max_restarts=max_restarts,
        local_addr=local_addr, host=host, entry=entry,
    )  # fmt: skip
    log.info("node %d of %d: joining rendezvous %s at %s", node_rank, nodes, run_id, endpoint)
    returncode = run_logged(command, env, agent_log)
    where = f"node {node_rank} of {nodes} (rendezvous {run_id} at {endpoint})"
    if returncode != 0:
        tail = agent_log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        if _RENDEZVOUS_FAILURES.search(tail):
            raise NodeLaunchError(
                f"{where}: could not join the rendezvous at {endpoint} within {timeout_s} s: "
                f"one of the {nodes} nodes must run on that machine, every node must reach it, "
                f"and all must start within the timeout; the agent's log is {agent_log}, which "
                f"ends with:\n{tail}"
            )
        raise NodeLaunchError(
            f"{where}: training exited with code {returncode}; the agent's log is {agent_log}, "
            f"which ends with:\n{tail}"
        )
    if node_rank != 0:
        shutil.rmtree(own, ignore_errors=True)
        return None
    if not (output / RESULT_FILE).is_file():
        raise NodeLaunchError(
            f"{where}: the training ended without {output / RESULT_FILE} (written by global rank "
            f"0 on whichever node it ran): is {output} one folder shared by every node?"
        )
    result = read_result(output)
    _log_losses(result)
    return result
