"""`fusellm plan CONFIG`: what a run would compute and why, and what it would cost, before it runs.

Nothing is built, downloaded or written (`fusellm.stages.plan_report`); the figures come from
files already on this machine or the config's `planning` hints (`fusellm.cli.estimates`).
"""

from __future__ import annotations

import json
import os
from itertools import groupby
from pathlib import Path
from typing import Annotated

import typer

from fusellm.cli.options import Home

Sets = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="override a field before validation, YAML value: --set training.lam=0.5, "
        "--set sources[1].dtype=float32 (repeatable)",
    ),
]


def read_config(config: Path, sets: list[str] | None):
    """The config with its overrides, or exit 2 with every problem on its own line."""
    from fusellm.cli.overrides import load_config
    from fusellm.config import FusionConfigError

    try:
        return load_config(config, sets or ())
    except FusionConfigError as err:
        for problem in err.problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2) from None


def _embedded_tracking(home: Path | None) -> None:
    """The registry `fusellm run` would use (part of the registration key), without creating
    the data folder: `fusellm.settings.apply_embedded_defaults` creates it, a plan must not."""
    from fusellm.settings import DEFAULT_HOME, HOME_ENV, MLFLOW_DB, TELEMETRY_OFF, sqlite_uri

    folder = Path(home or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MLFLOW_TRACKING_URI", sqlite_uri(folder / MLFLOW_DB))


def plan_command(
    config: Annotated[Path, typer.Argument(help="YAML fusion config (fields of FusionConfig)")],
    sets: Sets = None,
    mfu: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="model FLOPs utilisation assumed")
    ] = 0.4,
    peak_tflops: Annotated[
        float, typer.Option(min=0.001, help="GPU peak TFLOP/s (H100 SXM bf16 dense: 989)")
    ] = 989.0,
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus",
            help="GPUs per node (as torchrun's --nproc-per-node): also print each stage's "
            "wall-clock hours on the cluster and what its shared work folder must hold",
        ),
    ] = None,
    nodes: Annotated[
        int | None, typer.Option("--nodes", help="nodes of --gpus GPUs each (default 1)")
    ] = None,
    home: Home = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Which stages are done, which a run would compute and why, and the estimated cost."""
    from fusellm.cli.estimates import cluster_estimate, estimate
    from fusellm.stages.plan_report import plan_fusion

    cluster = cluster_size(gpus, nodes)
    fusion = read_config(config, sets)
    _embedded_tracking(home)
    report = plan_fusion(fusion)
    figures = estimate(fusion, report, mfu=mfu, peak_tflops=peak_tflops)
    if cluster is not None:
        figures.cluster = cluster_estimate(
            fusion, figures, report, nodes=cluster[0], gpus_per_node=cluster[1]
        )
    if as_json:
        typer.echo(json.dumps(plan_dict(config, report, figures), indent=2, default=str))
        return
    typer.echo(render(config, report, figures))


def cluster_size(gpus: int | None, nodes: int | None) -> tuple[int, int] | None:
    """(nodes, GPUs per node) from --nodes and --gpus; None when neither is given; else exit 2
    with what is wrong."""
    if gpus is None and nodes is None:
        return None
    problems = []
    if gpus is None:
        problems.append("--nodes needs --gpus, the GPUs of each node")
    elif gpus < 1:
        problems.append(f"--gpus {gpus}: a node needs at least 1 GPU (--gpus is GPUs per node)")
    if nodes is not None and nodes < 1:
        problems.append(f"--nodes {nodes}: a cluster needs at least 1 node")
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(2)
    return (nodes or 1, gpus)


def plan_dict(path: Path, report, figures) -> dict:
    return {
        "config": str(path),
        "workdir": str(report.config.workdir),
        "nothing_to_do": report.nothing_to_do,
        "stopped": report.stopped,
        "identities": report.identities,
        "units": [
            {
                "label": u.label,
                "stage": u.unit.stage,
                "key": u.unit.key,
                "done": u.done,
                "reason": u.reason,
            }
            for u in report.units
        ],
        "estimate": figures.as_dict(),
    }


# ---------------------------------------------------------------------------------------------
# Text


def number(value: float | None, unit: str = "") -> str:
    """1.8e9 -> '1.80e9'; small counts as they are; None -> '?'."""
    if value is None:
        return "?"
    if value == 0:
        return f"0{unit}"
    if abs(value) >= 1e5:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}{unit}"
    return f"{value:.0f}{unit}" if abs(value) >= 100 else f"{value:.3g}{unit}"


def size(value: float | None) -> str:
    if value is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def hours(value: float | None) -> str:
    if value is None:
        return "?"
    if value == 0:
        return "0"
    return f"{value:.1f}" if value >= 0.1 else f"{value:.1e}"


def wall(value: float | None) -> str:
    """Wall-clock hours: 0.07 rather than 7.0e-02 from 0.01 h up."""
    if value is not None and 0.01 <= value < 0.1:
        return f"{value:.2f}"
    return hours(value)


def _stage_lines(report) -> list[str]:
    if report.nothing_to_do:
        return [f"  nothing to do: all {len(report.units)} stage units are done"]
    lines = []
    pending = len(report.pending)
    if report.units:
        lines.append(f"  {pending} of the {len(report.units)} units looked at would be computed:")
    for (group, done, reason), items in groupby(
        report.units, key=lambda u: (u.group, u.done, u.reason)
    ):
        count = len(list(items))
        name = f"{group} ({count})" if count > 1 or group.endswith("*") else group
        status = "done" if done else "compute"
        lines.append(f"  {status:8s} {name:34s} {reason or ''}".rstrip())
    if report.stopped:
        first, *more = report.stopped.splitlines()
        lines.append(f"  not looked further: {first}")
        lines += [f"    {line}" for line in more]
        lines.append(
            "  (a run computes every stage whose folder is not in the work folder; the "
            "estimate counts every stage)"
        )
    return lines


def _estimate_lines(figures) -> list[str]:
    rate = figures.flops_per_gpu_second
    lines = [
        f"  at {figures.mfu:.0%} MFU of {figures.peak_tflops:g} TFLOP/s per GPU",
        (
            f"  {'stage':8s} {'what':40s} {'tokens':>9s} {'store':>9s} {'FLOPs':>9s} "
            f"{'GPU-h':>7s}  status"
        ),
    ]
    for r in figures.rows:
        store = size(r.bytes) if r.bytes is not None or r.stage != "train" else "-"
        flops = number(r.flops) if r.flops is not None or r.stage != "fuse" else "-"
        gpu = hours(r.gpu_hours(rate)) if r.stage != "fuse" else "-"
        lines.append(
            f"  {r.stage:8s} {r.what:40s} {number(r.tokens):>9s} {store:>9s} {flops:>9s} "
            f"{gpu:>7s}  {r.status}"
        )
    stored = figures.total("bytes")
    lines.append(
        f"  {'total':8s} {'':40s} {'':>9s} {size(stored):>9s} "
        f"{number(figures.total('flops')):>9s} {hours(figures.gpu_hours()):>7s}"
    )
    if any(r.status == "done" for r in figures.rows):
        lines.append(
            f"  to compute now: {hours(figures.gpu_hours('to compute'))} GPU-hours, "
            f"{size(figures.total('bytes', 'to compute'))} of new stores"
        )
    cpu = figures.cpu
    if cpu:
        workers = cpu["workers"]
        lines.append(
            f"  CPU: pieces {hours(cpu['pieces_cpu_hours'])} CPU-h on {workers['pieces']} "
            f"workers, align-and-fuse {hours(cpu['align_fuse_cpu_hours'])} CPU-h on "
            f"{workers['align_fuse']}: {hours(cpu['wall_hours'])} h of wall "
            f"({size(cpu['text_bytes'])} of text, {cpu['text_bytes_from']}; rates from "
            "docs/scaling.md)"
        )
    return lines


def render(path: Path, report, figures) -> str:
    config = report.config
    out = [f"plan for {path}: fusion {config.name!r}, work folder {config.workdir}", "", "stages"]
    out += _stage_lines(report)
    out += ["", "inputs"]
    for m in figures.models:
        out.append(
            f"  {m.name:18s} {', '.join(m.roles):14s} {number(m.parameters)} parameters "
            f"({m.parameters_from}), {number(m.tokens)} tokens ({m.tokens_from})"
        )
    out += ["", "estimate"] + _estimate_lines(figures)
    if figures.cluster:
        out += ["", "on a cluster"] + _cluster_lines(figures.cluster)
    notes = figures.notes + figures.cluster.get("notes", [])
    if notes:
        out += ["", "notes"] + [f"  {n}" for n in notes]
    return "\n".join(out)


def _gpus(count: int) -> str:
    return f"{count} GPU{'s' * (count != 1)}"


def _cluster_lines(cluster: dict) -> list[str]:
    gpus = cluster["gpus"]
    lines = [
        (
            f"  {cluster['nodes']} node{'s' * (cluster['nodes'] != 1)} x "
            f"{_gpus(cluster['gpus_per_node'])} per node = {_gpus(gpus)}, "
            "every stage of the fusion"
        ),
        f"  {'stage':8s} {'what':30s} {'units':>6s} {'GPU-h':>7s} {'wall-h':>7s}  how",
    ]
    for s in cluster["stages"]:
        cpu = s["gpu_hours"] is None and s["stage"] in ("prepare", "fuse")
        units = "-" if s["units"] is None else str(s["units"])
        gpu = "-" if cpu else hours(s["gpu_hours"])
        lines.append(
            f"  {s['stage']:8s} {s['what']:30s} {units:>6s} {gpu:>7s} "
            f"{wall(s['wall_hours']):>7s}  {s['how']}"
        )
    gpu_total = sum(s["gpu_hours"] or 0 for s in cluster["stages"])
    lines.append(
        f"  {'total':8s} {'':30s} {'':>6s} {hours(gpu_total):>7s} "
        f"{wall(cluster['wall_hours']):>7s}  without evaluation"
    )
    folder = cluster["shared_folder"]
    parts = ", ".join(f"{p['what']} {size(p['bytes'])}" for p in folder["parts"])
    lines.append(f"  shared work folder must hold {size(folder['bytes'])}: {parts}")
    return lines
