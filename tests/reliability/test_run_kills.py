"""`fusellm run` (Prefect flow, evaluation, MLflow registration) SIGKILLed, process tree and
all, while it evaluates and while it registers, then run again: the re-run computes only the
unfinished stage folders (asserted on the folders and on the Prefect task states), leaves no
temporary file, registers exactly one model version, finished, and ends with the fused weights,
scores and champion decision of an uninterrupted run (`fusellm.testing.faults`;
`benchmarks/fault_injection.py --run-kills N` aims kills at every stage)."""

from __future__ import annotations

import random

import pytest
from fusion_fixtures import run_tracking_uri, tiny_inputs, write_run_config
from mlflow import MlflowClient

from fusellm.testing.faults import (
    completed_tasks,
    finished_folders,
    kill_while_building,
    outputs,
    run_recovery_problems,
    run_summary,
    stage_seconds,
    start_run,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def finish(config, root, name):
    log = root / f"{name}.log"
    proc = start_run(config, log, root / f"{name}-home")
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return log


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-kills")
    models, corpus = tiny_inputs(root)
    finish(write_run_config(root, models, corpus, "reference"), root, "reference")
    return root, models, corpus


def test_killed_while_evaluating_and_registering_recovers(reference):
    root, models, corpus = reference
    config = write_run_config(root, models, corpus, "killed")
    work = root / "killed"
    rng = random.Random(0)
    for stage in ("evaluate", "register"):  # each kill lands within the stage's own duration
        window = 0.9 * stage_seconds(root / "reference", stage)
        proc = start_run(config, root / "killed-cut.log", root / "killed-home")
        assert kill_while_building(proc, work, stage, rng.uniform(0.0, window)), (
            f"the run ended before it was killed in {stage}"
        )
    before = finished_folders(work)
    assert not any(k.startswith("register/") for k in before)  # the kill cut registration
    log = finish(config, root, "killed")
    tracking = run_tracking_uri(root, "killed")
    assert (
        run_recovery_problems(work, root / "reference", before, log, tracking, "tiny-fused") == []
    )


def test_damaged_evaluation_results_are_recomputed(reference):
    """A finished fusion's evaluation result damaged on disk: found on reuse, that evaluation
    (and what depends on it) recomputed, the same scores."""
    import shutil

    root, models, corpus = reference
    work = root / "evaldamage"
    shutil.copytree(root / "reference", work)
    shutil.rmtree(work / "runs")  # the record of the last fusion belongs to the reference
    victim = max((work / "evaluate").glob("[!.]*/result/**/*.json"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-7])
    folder = victim.relative_to(work).parts[:2]
    before = finished_folders(work)
    log = finish(write_run_config(root, models, corpus, "evaldamage"), root, "evaldamage")
    assert (work / folder[0] / f".{folder[1]}.corrupt").is_dir()  # set aside, kept to look at
    assert completed_tasks(log)  # the damaged evaluation, the comparison, the registration
    assert all(n.startswith(("evaluate", "compare", "register")) for n in completed_tasks(log))
    unchanged = {k: v for k, v in before.items() if not k.startswith(("evaluate", "compare"))}
    assert {k: finished_folders(work)[k] for k in unchanged} == unchanged
    assert run_summary(work)["scores"] == run_summary(root / "reference")["scores"]


def test_two_runs_at_once_register_one_version(reference):
    """Two `fusellm run` of one config started together on one work folder and one MLflow
    store: both end well, each stage folder is built once, and one model version exists."""
    root, models, corpus = reference
    config = write_run_config(root, models, corpus, "twice")
    procs = [start_run(config, root / f"twice-{i}.log", root / f"twice-{i}-home") for i in (0, 1)]
    assert [p.wait(timeout=900) for p in procs] == [0, 0], (root / "twice-0.log").read_text()[
        -3000:
    ]
    built = [completed_tasks(root / f"twice-{i}.log") for i in (0, 1)]
    assert sorted(built[0] + built[1]) == sorted(completed_tasks(root / "reference.log"))
    versions = MlflowClient(run_tracking_uri(root, "twice")).search_model_versions(
        "name = 'tiny-fused'"
    )
    assert len(versions) == 1 and versions[0].tags.get("fusellm.role")
    assert outputs(root / "twice") == outputs(root / "reference")
