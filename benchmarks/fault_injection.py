"""Fault injection at larger counts than the test suite runs (tests/reliability/test_kill_recover.py,
tests/reliability/test_hostile_input.py): kill-and-recover, damaged artifacts, fuzzed input.

    .venv/bin/python benchmarks/fault_injection.py --kills 100      # ~40 s a kill on 2 cores
    .venv/bin/python benchmarks/fault_injection.py --corrupt 50
    .venv/bin/python benchmarks/fault_injection.py --fuzz 5000
    .venv/bin/python benchmarks/fault_injection.py --run-kills 20   # ~1 min a kill

Kills: a tiny fusion (walked to training in its own process, `fusellm.testing.faults`) is
SIGKILLed, process group and all, at a uniformly random moment of its run, then run again to
the end; it passes when its fused data and trained weights equal those of an uninterrupted run
and no half-built folder or temporary file is left. Corrupt: a copy of the finished fusion has
one random file of a random stage folder flipped, truncated or deleted, and is run again (up to
twice: a damage found by a reader moves the folder aside and fails the run naming the file);
same check. Run-kills: the whole `fusellm run` (Prefect flow, evaluation, MLflow registration
in a SQLite store of its own) is killed in each stage in turn (those that take at least AIMABLE_S; the quicker ones are
only hit by the random kills above), a random moment within that
stage's duration in an uninterrupted run, then run again; it passes when only unfinished folders
were computed, the outputs, scores and champion decision equal the uninterrupted run's and
exactly one finished model version is registered (`fusellm.testing.faults.run_recovery_problems`).
Fuzz: the hostile-input tests with N examples each. Each mode prints one line
``N passed, M failed`` (and the failures above it); the last line is JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, emit

sys.path.insert(0, str(ROOT / "tests"))

from fusion_fixtures import run_tracking_uri, tiny_inputs, write_fault_config, write_run_config

from fusellm.testing.faults import (
    damage_one,
    finished_folders,
    finished_stages,
    kill_while_building,
    leftovers,
    outputs,
    run_recovery_problems,
    run_walk,
    stage_seconds,
    start_run,
)

MiB = 2**20
RUN_STAGES = (
    "pieces",
    "extract",
    "store",
    "vocab",
    "fuse",
    "fused",
    "train",
    "evaluate",
    "compare",
    "register",
)
AIMABLE_S = 0.1  # a stage quicker than this is over before a watcher polling its folder sees it


def prepare(root: Path) -> dict:
    models, corpus = tiny_inputs(root)
    seconds = []
    for name in ("reference", "reference-timed"):  # the first run on a machine builds
        config = write_fault_config(root, models, corpus, name)  # DeepSpeed's ops: time
        started = time.monotonic()  # the second
        if run_walk(config, root / f"{name}.log") != 0:
            raise SystemExit(f"the uninterrupted run failed: {root / name}.log")
        seconds.append(time.monotonic() - started)
    return {
        "models": models,
        "corpus": corpus,
        "expected": outputs(root / "reference"),
        "seconds": seconds[-1],
    }


def verdict(work: Path, expected: dict) -> str | None:
    if outputs(work) != expected:
        return "outputs differ from the uninterrupted run"
    left = leftovers(work)
    return f"left behind: {left[:3]}" if left else None


def settle(outcome: dict, problem: str | None, label: str, work: Path) -> None:
    """Count one trial: a failure is printed and its folder kept to look at; a pass removed."""
    if problem:
        outcome["failed"].append(f"{label}: {problem}")
        print(outcome["failed"][-1], flush=True)
    else:
        outcome["passed"] += 1
        shutil.rmtree(work, ignore_errors=True)


def kills(root: Path, ref: dict, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    outcome: dict = {"passed": 0, "failed": [], "kills": []}
    for i in range(n):
        name = f"kill-{i}"
        config = write_fault_config(root, ref["models"], ref["corpus"], name)
        log = root / f"{name}.log"
        at = rng.uniform(0.5, ref["seconds"])
        killed = run_walk(config, log, kill_after=at) is None
        stages = finished_stages(root / name)
        problem = None if run_walk(config, log) == 0 else f"the re-run failed ({log})"
        problem = problem or verdict(root / name, ref["expected"])
        settle(
            outcome,
            problem,
            f"kill {i} at {at:.1f} s (killed: {killed}, done: {stages})",
            root / name,
        )
        outcome["kills"].append({"at": round(at, 2), "killed": killed, "finished": stages})
    return outcome


def corruptions(root: Path, ref: dict, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    outcome: dict = {"passed": 0, "failed": [], "damages": []}
    for i in range(n):
        name = f"damaged-{i}"
        shutil.copytree(root / "reference", root / name)
        config = write_fault_config(root, ref["models"], ref["corpus"], name)
        what = damage_one(root / name, rng)
        log = root / f"{name}.log"
        runs = [run_walk(config, log)]
        if runs[-1] != 0:  # found by a reader: the folder was moved aside, run again
            runs.append(run_walk(config, log))
        problem = None if runs[-1] == 0 else f"the re-runs failed ({log})"
        problem = problem or verdict(root / name, ref["expected"])
        settle(outcome, problem, what, root / name)
        outcome["damages"].append({"damage": what, "runs": len(runs)})
    return outcome


def run_kills(root: Path, n: int, seed: int) -> dict:
    """Kill `fusellm run` in each stage in turn (see the module's docstring)."""
    models, corpus = tiny_inputs(root, prefix="run-")
    reference = root / "run-reference"
    if _run_to_end(write_run_config(root, models, corpus, reference.name), root, reference.name):
        raise SystemExit(f"the uninterrupted run failed: {root / 'run-reference.log'}")
    rng = random.Random(seed)
    stages = [s for s in RUN_STAGES if stage_seconds(reference, s) >= AIMABLE_S]
    outcome: dict = {"passed": 0, "failed": [], "kills": [], "stages": stages}
    for i in range(n):
        name, stage = f"run-kill-{i}", stages[i % len(stages)]
        config = write_run_config(root, models, corpus, name)
        delay = rng.uniform(0.0, 0.9 * stage_seconds(reference, stage))
        proc = start_run(config, root / f"{name}-cut.log", root / f"{name}-home")
        killed = kill_while_building(proc, root / name, stage, delay)
        before = finished_folders(root / name)
        problems = [] if killed else [f"the run ended before the kill in {stage}"]
        if _run_to_end(config, root, name):
            problems.append(f"the re-run failed ({root / name}.log)")
        else:
            problems += run_recovery_problems(
                root / name,
                reference,
                before,
                root / f"{name}.log",
                run_tracking_uri(root, name),
                "tiny-fused",
            )
        settle(
            outcome, "; ".join(problems) or None, f"{name} in {stage} +{delay:.2f} s", root / name
        )
        outcome["kills"].append(
            {"stage": stage, "delay": round(delay, 2), "finished_before": len(before)}
        )
    return outcome


def _run_to_end(config: Path, root: Path, name: str) -> int:
    return start_run(config, root / f"{name}.log", root / f"{name}-home").wait()


def s3_faults(root: Path, n: int, seed: int) -> dict:
    """Random object-store faults through the proxy (`fusellm.testing.s3faults`)."""
    import boto3
    from support import free_port, running_server

    from fusellm.settings import LOCALHOST
    from fusellm.testing import s3faults

    folder = root / "s3-src"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "big.bin").write_bytes(random.Random(seed).randbytes(6 * MiB))
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "vocab.txt").write_text("a\nb\n")
    port = free_port()
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FUSELLM_S3_MAX_ATTEMPTS": str(s3faults.ATTEMPTS),
        "FUSELLM_S3_TIMEOUT": "2",
        "FUSELLM_S3_MULTIPART_THRESHOLD": str(5 * MiB),
        "FUSELLM_S3_MULTIPART_CHUNK": str(5 * MiB),
    }
    os.environ.update(env)
    moto = [str(Path(sys.executable).with_name("moto_server")), "-H", LOCALHOST, "-p", str(port)]
    rng = random.Random(seed)
    outcome: dict = {"passed": 0, "failed": [], "faults": []}
    with running_server(moto, root / "moto.log", env, port=port, timeout=60):
        upstream = f"http://{LOCALHOST}:{port}"
        boto3.client("s3", endpoint_url=upstream).create_bucket(Bucket="flaky")
        with s3faults.FaultyS3Proxy(upstream) as proxy:
            os.environ["FUSELLM_S3_ENDPOINT_URL"] = proxy.url
            for i in range(n):
                fault = s3faults.random_fault(rng, rng.choice(["GET", "PUT"]))
                scratch = root / f"s3-{i}"
                label = (
                    f"s3 {i}: {fault.kind} on {fault.method} {fault.key or 'anything'} "
                    f"x{fault.times or 'always'}"
                )
                try:
                    problem = s3faults.trial_problem(
                        proxy, fault, folder, f"s3://flaky/t{i}", scratch
                    )
                except Exception as err:  # noqa: BLE001 - a traceback is a failed trial
                    problem = f"unexpected {type(err).__name__}: {err}"
                settle(outcome, problem, label, scratch)
                outcome["faults"].append(
                    {
                        "kind": fault.kind,
                        "method": fault.method,
                        "key": fault.key,
                        "times": fault.times,
                        "recovered": s3faults.should_recover(fault),
                    }
                )
    return outcome


def fuzz(n: int) -> dict:
    env = {**os.environ, "FUSELLM_FUZZ_EXAMPLES": str(n)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "reliability" / "test_hostile_input.py"),
        ],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error)", tail)}
    if proc.returncode and not counts.get("failed"):
        counts["failed"] = 1  # pytest itself failed (collection, an error): count it
    return {
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "pytest": tail,
        "examples_each": n,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=0)
    parser.add_argument("--corrupt", type=int, default=0)
    parser.add_argument("--run-kills", type=int, default=0, help="kills of `fusellm run`")
    parser.add_argument("--s3", type=int, default=0, help="random object-store faults")
    parser.add_argument("--fuzz", type=int, default=0, help="examples per fuzzed test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp one)")
    args = parser.parse_args(argv)
    if not (args.kills or args.corrupt or args.run_kills or args.s3 or args.fuzz):
        parser.error("give --kills N, --corrupt N, --run-kills N, --s3 N and/or --fuzz N")
    root = args.out or Path(tempfile.mkdtemp(prefix="fusellm-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    result: dict = {"bench": "fault-injection", "seed": args.seed}
    started = time.monotonic()
    if args.kills or args.corrupt:
        ref = prepare(root)
        result["uninterrupted_seconds"] = round(ref["seconds"], 1)
        if args.kills:
            r = kills(root, ref, args.kills, args.seed)
            missed = sum(not k["killed"] for k in r["kills"])
            print(
                f"kill-and-recover: {r['passed']} passed, {len(r['failed'])} failed "
                f"({missed} of the runs ended before their kill)",
                flush=True,
            )
            result["kills"] = r
        if args.corrupt:
            r = corruptions(root, ref, args.corrupt, args.seed)
            print(f"corruption: {r['passed']} passed, {len(r['failed'])} failed", flush=True)
            result["corruption"] = r
    if args.run_kills:
        r = run_kills(root, args.run_kills, args.seed)
        print(f"run-kill-and-recover: {r['passed']} passed, {len(r['failed'])} failed", flush=True)
        result["run_kills"] = r
    if args.s3:
        r = s3_faults(root, args.s3, args.seed)
        print(f"object-store faults: {r['passed']} passed, {len(r['failed'])} failed", flush=True)
        result["s3"] = r
    if args.fuzz:
        r = fuzz(args.fuzz)
        print(
            f"fuzzing: {r['passed']} passed, {r['failed']} failed (the hostile-input tests, "
            f"{args.fuzz} examples each)",
            flush=True,
        )
        result["fuzz"] = r
    result["seconds"] = round(time.monotonic() - started, 1)
    emit(result)
    return result


if __name__ == "__main__":
    main()
