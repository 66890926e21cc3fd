"""A fusion killed (SIGKILL, the whole process group) in chosen stages, or with an artifact
damaged on disk, and run again ends with the same fused data and the same trained weights as a
run never interrupted, and leaves no half-built folder or temporary file behind
(`fusellm.testing.faults`; `benchmarks/fault_injection.py` runs the same at larger counts)."""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest
from fusion_fixtures import tiny_inputs, write_fault_config

from fusellm.testing.faults import (
    built,
    damage_one,
    kill_while_building,
    leftovers,
    outputs,
    run_walk,
    stage_seconds,
    start_walk,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    models, corpus = tiny_inputs(root)
    config = write_fault_config(root, models, corpus, "reference")
    started = time.monotonic()
    assert run_walk(config, root / "reference.log") == 0, (root / "reference.log").read_text()[
        -3000:
    ]
    expected = outputs(root / "reference")
    assert {k.split("/")[0] for k in expected} == {"fused", "train"}
    return root, models, corpus, expected, time.monotonic() - started


def test_killed_runs_recover_to_the_same_result(reference):
    """Killed in extraction, then in align-and-fuse, then in training, each time a random
    moment within that stage's duration (aimed by watching its partial folder: the first run
    on a machine, which compiles DeepSpeed's ops, is no measure of time), then run to the end."""
    root, models, corpus, expected, _ = reference
    config = write_fault_config(root, models, corpus, "killed")
    rng = random.Random(int(os.environ.get("FUSELLM_KILL_SEED", "0")))
    log = root / "killed.log"
    for stage in ("extract", "fuse", "train"):
        delay = rng.uniform(0.0, 0.9 * stage_seconds(root / "reference", stage))
        proc = start_walk(config, log)
        assert kill_while_building(proc, root / "killed", stage, delay), f"not killed in {stage}"
    assert run_walk(config, log) == 0, log.read_text()[-3000:]
    assert outputs(root / "killed") == expected
    assert leftovers(root / "killed") == []


def test_damaged_artifacts_are_recomputed_to_the_same_result(reference):
    root, models, corpus, expected, _ = reference
    rng = random.Random(1)
    work = root / "damaged"
    shutil.copytree(root / "reference", work)
    config = write_fault_config(root, models, corpus, "damaged")
    log = root / "damaged.log"
    for _ in range(3):
        what = damage_one(work, rng)
        assert run_walk(config, log) == 0, f"{what}: {log.read_text()[-3000:]}"
        assert outputs(work) == expected, what
    assert leftovers(work) == []


def test_two_runs_at_once_build_everything_once(reference):
    """Two walks of the same config on the same work folder, started together: each stage
    folder is built by one of them (the other waits and reuses it), and the result is the
    uninterrupted run's."""
    root, models, corpus, expected, _ = reference
    config = write_fault_config(root, models, corpus, "twice")
    logs = [root / "twice-a.log", root / "twice-b.log"]
    runs = [start_walk(config, log) for log in logs]
    assert [r.wait(timeout=600) for r in runs] == [0, 0], logs[0].read_text()[-2000:]
    solo = built(root / "reference.log")
    a, b = (built(log) for log in logs)
    assert {s: a.get(s, 0) + b.get(s, 0) for s in solo} == solo
    assert sum(solo.values()) > 10  # the whole fusion was built, split between the two
    assert outputs(root / "twice") == expected
    assert leftovers(root / "twice") == []
