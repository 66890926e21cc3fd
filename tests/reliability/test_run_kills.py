"""`fusellm run` (Prefect flow, evaluation, MLflow registration) SIGKILLed, process tree and
all, while it evaluates and while it registers, then run again: the re-run computes only the
unfinished stage folders (asserted on the folders and on the Prefect task states), leaves no
temporary file, registers exactly one model version, finished, and ends with the fused weights,
scores and champion decision of an uninterrupted run (`fusellm.testing.faults`;
`benchmarks/fault_injection.py --run-kills N` aims kills at every stage)."""

from __future__ import annotations

import random

import pytest
from fusion_fixtures import (
    build_models,
    corpus_texts,
    run_tracking_uri,
    write_corpus,
    write_run_config,
)

from fusellm.testing.faults import (
    finished_folders,
    kill_while_building,
    run_recovery_problems,
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
    texts = corpus_texts(8)
    models = {k: str(v) for k, v in build_models(root / "models", texts).items()}
    corpus = write_corpus(root / "corpus", texts)
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
