"""One machine of a training across nodes, without Prefect: a Kubernetes Indexed Job's pod, or
a command started on each machine by hand or by a batch scheduler.

    python -m fusellm.stages.nodes CONFIG [--label fused] [--node-rank N]
                                   [--rendezvous HOST:PORT] [--local-addr ADDRESS]
                                   [--host-node 0]

Walks the fusion up to align_fuse (finding it done in the shared work folder, or building what
is missing: every machine may take units of it, each under its key's lock), then runs this
machine's part of each training the config makes, the fused model, then the CLM baseline when
it is evaluated, or only of those named with --label. Every machine goes through the trainings
in the same order, so the nodes of each meet in its rendezvous. `--node-rank` defaults to
$JOB_COMPLETION_INDEX (the index of an Indexed Job's pod); `--rendezvous` replaces
`training.rendezvous` (where node 0 runs is known when the job is made, and is in no key);
`--local-addr` is the address the other machines reach this one by (default: its host name,
or $FUSELLM_NODE_ADDRESS); `--host-node 0` makes node 0 host the rendezvous whatever the
endpoint's name resolves to when it starts (a pod's DNS record may come later). Prints one JSON line per training; exits 2 on a wrong argument or
config, 1 when the training failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

INDEX_VARIABLE = "JOB_COMPLETION_INDEX"  # set by Kubernetes in the pods of an Indexed Job


def with_rendezvous(config, endpoint: str):
    """`config` with `training.rendezvous` replaced, validated as if it had been in the file."""
    from fusellm.config import parse_fusion_config

    data = config.model_dump(mode="json")
    data["training"] = {**data["training"], "rendezvous": endpoint}
    return parse_fusion_config(data, source="--rendezvous")


def node_rank_from(value: int | None, environ=None) -> int:
    environ = os.environ if environ is None else environ
    if value is not None:
        return value
    index = environ.get(INDEX_VARIABLE, "")
    if not index.isdigit():
        raise ValueError(
            f"--node-rank: not given, and ${INDEX_VARIABLE} is {index!r} (set in the pods of an "
            "Indexed Job): give this machine's node rank, 0 to training.nodes - 1"
        )
    return int(index)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusellm.stages.nodes",
        description="One machine of a training across nodes (training.nodes machines).",
    )
    p.add_argument("config", type=Path, help="the fusion config (YAML)")
    p.add_argument(
        "--label",
        action="append",
        choices=("fused", "baseline"),
        help="a training to take part in (repeatable; default: every training of the config)",
    )
    p.add_argument(
        "--node-rank", type=int, help=f"this machine's node (default: ${INDEX_VARIABLE})"
    )
    p.add_argument("--rendezvous", help="HOST:PORT of node 0's machine (training.rendezvous)")
    p.add_argument("--local-addr", help="the address other machines reach this one by")
    p.add_argument(
        "--host-node",
        type=int,
        help="the node rank whose machine hosts the rendezvous (default: the machine the "
        "endpoint names, as torchrun finds it by comparing addresses)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from fusellm.config import FusionConfigError, load_fusion_config
    from fusellm.stages import pipeline
    from fusellm.stages.base import StageError
    from fusellm.stages.training import check_train_node, train_node
    from fusellm.train.config import TrainConfigError
    from fusellm.train.launch import LaunchError

    args = parser().parse_args(argv)
    try:
        config = load_fusion_config(args.config)
        if args.rendezvous:
            config = with_rendezvous(config, args.rendezvous)
        node_rank = node_rank_from(args.node_rank)
        labels = args.label or ["fused", *(["baseline"] if config.evaluation.baseline else [])]
        for label in labels:
            check_train_node(config, label, node_rank)
    except (FusionConfigError, StageError, TrainConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ex = pipeline.Executor()
    try:
        done = pipeline.walk(config, ex, until="align_fuse")
        for label in labels:
            host = None if args.host_node is None else node_rank == args.host_node
            out = train_node(done, ex, label, node_rank, local_addr=args.local_addr, host=host)
            print(json.dumps(out), flush=True)
    except (LaunchError, StageError, TrainConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
