"""Fault injection for the reliability tests and `benchmarks/fault_injection.py`.

A fusion is walked (library executor, up to training) in a process of its own, which can be
killed with SIGKILL, process group and all, at any moment; its artifacts can be damaged on
disk. Recovery is judged on what a fusion is for: the fused data and the trained weights must
equal those of a run that was never interrupted, and no half-built folder or temporary file
may be left behind.

    python -m fusellm.testing.faults CONFIG.json      # the walk itself

The whole command, `fusellm run` (Prefect flow, evaluation, MLflow registration), is killed
the same way by `start_run` and `kill_while_building`, which aim a kill at a chosen stage: it
lands a random moment after that stage's first partial folder appears.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

OUTPUTS = ("fused/[!.]*/store/*.safetensors", "train/[!.]*/model/*.safetensors")


def start_walk(config: Path, log: Path) -> subprocess.Popen:
    """A walk of `config` started in a process group of its own, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fusellm.testing.faults", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes its children too
        )


def run_walk(config: Path, log: Path, kill_after: float | None = None) -> int | None:
    """Exit code of a walk of `config`, or None when it was killed after `kill_after` s."""
    proc = start_walk(config, log)
    try:
        return proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def start_run(config: Path, log: Path, home: Path) -> subprocess.Popen:
    """`fusellm run CONFIG --home HOME` in a process group of its own, output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                str(Path(sys.executable).with_name("fusellm")),
                "run",
                str(config),
                "--home",
                str(home),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_while_building(
    proc: subprocess.Popen, work: Path, stage: str, delay: float, timeout: float = 900.0
) -> bool:
    """SIGKILL `proc`'s process group `delay` s after a partial folder of `stage` appears in
    `work`; False when the process ended first (nothing was killed)."""
    deadline = time.monotonic() + timeout
    while not any(Path(work).glob(f"{stage}/.*.partial")):
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def finished_folders(work: Path) -> dict[str, int]:
    """{stage/key: mtime of its stage.json} of every finished stage folder: a folder a re-run
    rebuilt, or touched, shows as a changed mtime."""
    return {
        str(p.parent.relative_to(work)): p.stat().st_mtime_ns
        for p in Path(work).glob("*/[!.]*/stage.json")
    }


def stage_seconds(work: Path, stage: str) -> float:
    """How long the quickest folder of `stage` took to build in a finished fusion at `work`:
    the window a kill aimed at that stage must land in."""
    return min(
        json.loads(p.read_text())["seconds"] for p in Path(work).glob(f"{stage}/[!.]*/stage.json")
    )


def completed_tasks(log: Path) -> list[str]:
    """Prefect task runs a `fusellm run` log shows as computed (Completed, not Cached), leaving
    out those that run every time (resolving and fetching sources are not stage folders)."""
    found = re.findall(r"Task run '([^']+)' - Finished in state Completed\(", Path(log).read_text())
    return sorted(n for n in found if n not in ("resolve-sources", "fetch-model"))


def run_recovery_problems(
    work: Path, reference: Path, before: dict[str, int], log: Path, tracking_uri: str, name: str
) -> list[str]:
    """What is wrong with a `fusellm run` finished after kills (empty when nothing is).

    `before`: `finished_folders(work)` after the last kill; `log`: the finishing run's output;
    `reference`: the work folder of an uninterrupted run of the same fusion.
    """
    from mlflow import MlflowClient

    problems = []
    after = finished_folders(work)
    if any(after.get(k) != v for k, v in before.items()):
        problems.append("a folder finished before the re-run was rebuilt or touched")
    new, computed = set(after) - set(before), completed_tasks(log)
    if len(computed) != len(new):
        problems.append(f"{len(computed)} tasks computed for {len(new)} unfinished folders")
    if leftovers(work):
        problems.append(f"left behind: {leftovers(work)[:3]}")
    if outputs(work) != outputs(reference):
        problems.append("fused data or weights differ from the uninterrupted run's")
    ours, theirs = run_summary(work), run_summary(reference)
    if ours["scores"] != theirs["scores"]:
        problems.append(f"scores {ours['scores']} differ from {theirs['scores']}")
    decided = ours["registration"]["is_champion"]
    if decided != theirs["registration"]["is_champion"]:
        problems.append("the champion decision differs from the uninterrupted run's")
    versions = MlflowClient(tracking_uri).search_model_versions(f"name = '{name}'")
    roles = [v.tags.get("fusellm.role") for v in versions]
    if roles != ["champion" if decided else "challenger"]:
        problems.append(f"registered versions' roles {roles}: expected one, finished")
    return problems


def run_summary(work: Path) -> dict:
    """The summary of the last fusion finished at `work` (its record in `runs/`)."""
    (record,) = Path(work).glob("runs/*.json")
    return json.loads(record.read_text())["summary"]


def outputs(work: Path) -> dict[str, str]:
    """sha256 of the fused store's data files and of each trained model's weights."""
    out = {}
    for pattern in OUTPUTS:
        for path in sorted(Path(work).glob(pattern)):
            out[str(path.relative_to(work))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(work: Path) -> list[Path]:
    """Half-built stage folders and temporary files: none may survive a finished run."""
    work = Path(work)
    partial = [p for p in work.glob("*/.*.partial")]
    temporary = [p for p in work.rglob("*.tmp")]
    return sorted(partial + temporary)


def finished_stages(work: Path) -> list[str]:
    """The stages with at least one finished folder: how far a killed run had come."""
    return sorted({p.parent.parent.name for p in Path(work).glob("*/[!.]*/stage.json")})


def damage_one(work: Path, rng: random.Random) -> str:
    """Flip a byte in, truncate, or delete one file of a finished stage folder; says which."""
    folders = [record.parent for record in Path(work).glob("*/[!.]*/stage.json")]
    files = sorted(
        p
        for folder in folders
        for p in folder.rglob("*")
        if p.is_file() and p.name != "stage.json" and p.stat().st_size > 0
    )
    victim = rng.choice(files)
    how = rng.choice(["flip", "truncate", "delete"])
    if how == "flip":
        data = bytearray(victim.read_bytes())
        data[rng.randrange(len(data))] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif how == "truncate":
        victim.write_bytes(victim.read_bytes()[: rng.randrange(len(victim.read_bytes()))])
    else:
        victim.unlink()
    return f"{how} {victim.relative_to(work)}"


def built(log: Path) -> dict[str, int]:
    """Stage folders a finished walk built itself (not found built), per stage, from its log."""
    lines = [line for line in Path(log).read_text().splitlines() if line.startswith(TALLY)]
    if not lines:
        raise ValueError(f"{log}: no walk finished here")
    states = json.loads(lines[-1][len(TALLY) :])
    steps = ("resolve-sources", "fetch-model")  # not stage folders: they run every time
    return {s: names.count("Completed") for s, names in states.items() if s not in steps}


TALLY = "TALLY "  # the last line of a finished walk: what each unit's state was


def _walk(config_path: str) -> None:
    from fusellm.config import parse_fusion_config
    from fusellm.stages.pipeline import Executor, walk

    config = parse_fusion_config(json.loads(Path(config_path).read_text()))
    ex = Executor()
    walk(config, ex, until="train")
    print(TALLY + json.dumps(ex.tally.as_dict()), flush=True)


if __name__ == "__main__":
    _walk(sys.argv[1])
