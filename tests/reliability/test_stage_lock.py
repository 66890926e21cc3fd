"""Two runs of the same fusion at once build each stage folder once (fusellm.stages.base)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fusellm.stages.base import build_stage


def _slow_build(log: str, folder: Path) -> dict:
    """Appends who built to `log`, then takes its time, as a real stage would."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    (folder / "out.txt").write_text("made once")
    return {"by": os.getpid()}


def _build_in_process(workdir: str, log: str, queue) -> None:
    artifact = build_stage(Path(workdir), "s", "k", functools.partial(_slow_build, log))
    queue.put((artifact.info, artifact.reused))


def test_two_processes_build_a_folder_once(tmp_path):
    log = tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    runs = [
        ctx.Process(target=_build_in_process, args=(str(tmp_path), str(log), queue))
        for _ in range(2)
    ]
    for run in runs:
        run.start()
    results = [queue.get(timeout=120) for _ in runs]
    for run in runs:
        run.join(timeout=60)
        assert run.exitcode == 0
    assert len(log.read_text().splitlines()) == 1  # one build, the other run waited for it
    (info_a, reused_a), (info_b, reused_b) = results
    assert info_a == info_b and sorted([reused_a, reused_b]) == [False, True]
    assert (tmp_path / "s" / "k" / "out.txt").read_text() == "made once"
    assert not list((tmp_path / "s").glob(".*partial"))


def test_threads_build_a_folder_once(tmp_path):
    log = tmp_path / "builds.log"
    build = functools.partial(_slow_build, str(log))
    with ThreadPoolExecutor(4) as pool:
        artifacts = list(pool.map(lambda _: build_stage(tmp_path, "s", "k", build), range(4)))
    assert len(log.read_text().splitlines()) == 1
    assert len({a.path for a in artifacts}) == 1 and sum(not a.reused for a in artifacts) == 1
