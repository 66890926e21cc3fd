"""`UnitPool`: this process is one of the places units build in, and no more than `workers`
build at once, whoever drives the units (threads of the library executor or Prefect tasks)."""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fusellm.stages.base import Unit, UnitPool, run_units_in_pool


def _record(seconds: float, folder) -> dict:
    """A unit's build: where (process, thread) and when it ran."""
    started = time.time()
    time.sleep(seconds)
    return {
        "pid": os.getpid(),
        "thread": threading.get_ident(),
        "started": started,
        "ended": time.time(),
    }


def _units(workdir, n: int, seconds: float = 0.4) -> list[Unit]:
    build = functools.partial(_record, seconds)
    return [
        Unit("probe", f"k{i:02d}", f"probe-{i}", workdir, build, in_process_pool=True)
        for i in range(n)
    ]


def _most_at_once(infos: list[dict]) -> int:
    edges = sorted([(i["started"], 1) for i in infos] + [(i["ended"], -1) for i in infos])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_this_process_builds_too_and_at_most_workers_at_once(tmp_path):
    artifacts = run_units_in_pool(_units(tmp_path, 8), workers=2)
    infos = [a.info for a in artifacts]
    pids = {i["pid"] for i in infos}
    assert os.getpid() in pids and len(pids) == 2  # here, and one spawned process
    assert _most_at_once(infos) <= 2
    assert [a.key for a in artifacts] == [f"k{i:02d}" for i in range(8)]


def test_many_callers_share_the_places(tmp_path):
    """As Prefect drives it: one thread per unit, all at once."""
    units = _units(tmp_path, 6, seconds=0.3)
    with UnitPool(3) as pool, ThreadPoolExecutor(len(units)) as callers:
        artifacts = list(callers.map(pool.build, units))
    infos = [a.info for a in artifacts]
    assert [a.key for a in artifacts] == [u.key for u in units]
    assert _most_at_once(infos) <= 3
    here = [i for i in infos if i["pid"] == os.getpid()]
    assert here and len({i["thread"] for i in here}) == 1  # one thread: tokenizers loaded once


def test_built_units_are_found_not_rebuilt(tmp_path):
    units = _units(tmp_path, 3, seconds=0.0)
    first = run_units_in_pool(units, workers=2)
    again = run_units_in_pool(units, workers=2)
    assert [a.info for a in again] == [a.info for a in first]
    assert all(a.reused for a in again)


def test_a_pool_needs_two_places():
    with pytest.raises(ValueError, match="at least 2 workers"):
        UnitPool(1)


def _corrupt(path: str):
    from fusellm.data.store import CorruptStoreError

    raise CorruptStoreError(path, f"{path}: sha256 does not match the manifest")


def test_a_corrupt_file_error_crosses_the_process_boundary_intact():
    """Raised in a worker process, it reaches the parent with its file (the pool survives)."""
    from fusellm.data.store import CorruptStoreError
    from fusellm.stages.base import cores, process_pool

    with process_pool(1) as pool:
        with pytest.raises(CorruptStoreError) as err:
            pool.submit(_corrupt, "/w/extract/k/store/shard-00000.safetensors").result()
        assert err.value.path.name == "shard-00000.safetensors"
        assert "sha256" in str(err.value)
        assert pool.submit(os.getpid).result() != os.getpid()  # still working
    assert 1 <= cores() <= (os.cpu_count() or 1)
