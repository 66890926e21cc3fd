"""Prefect tasks for the fusion's stages: one task per unit of stage work, no science here.

The stage folder is the only cache: a unit whose folder exists returns at once, and its task
ends in a ``Cached`` state, so the Prefect UI shows what was reused. Prefect's own result cache
is off (``NO_CACHE``): it kept paths apart from the folders, and after a work folder was deleted
it handed back paths that no longer existed. Steps that talk to the network (resolving and
fetching sources) retry with exponential backoff.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from fusellm.stages.base import Artifact, Unit, build_in_pool, process_pool
from fusellm.stages.pipeline import Executor, MlflowTracker

NETWORK_RETRIES = 3
NETWORK_BACKOFF = exponential_backoff(backoff_factor=5)  # 5, 10, 20 s (with jitter)
NETWORK_STEPS = {"resolve-sources", "fetch-model"}


@task(cache_policy=NO_CACHE)
def run_unit(unit: Unit, pool=None):
    """Build one stage folder (or find it built): ``Cached`` when it already existed.

    `pool`: worker processes for CPU-bound units (align and fuse), past the GIL.
    """
    artifact = unit.run() if pool is None else build_in_pool(pool, unit)
    if artifact.reused:
        return Completed(data=artifact, name="Cached", message=f"{unit.stage}/{unit.key} exists")
    return artifact


@task(cache_policy=NO_CACHE)
def run_step(fn, *args):
    return fn(*args)


class PrefectExecutor(Executor):
    """Each unit a Prefect task (named after its stage); independent units run concurrently."""

    def __init__(self):
        super().__init__(MlflowTracker())

    def call(self, name: str, fn, *args):
        options = {"name": name, "task_run_name": name}
        if name in NETWORK_STEPS:
            options.update(retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_BACKOFF)
        state = run_step.with_options(**options)(fn, *args, return_state=True)
        self.tally.add(name, state.name)
        return state.result()

    def _task(self, unit: Unit):
        return run_unit.with_options(name=unit.stage, task_run_name=unit.label)

    def run(self, unit: Unit) -> Artifact:
        state = self._task(unit)(unit, return_state=True)
        self.tally.add(unit.stage, state.name)
        return state.result()

    def run_all(self, units: list[Unit], workers: int = 1) -> list[Artifact]:
        """All units as concurrent task runs; units meant for a process pool share one of
        `workers` processes, so at most that many build at once."""
        if workers > 1 and units and all(u.in_process_pool for u in units):
            with process_pool(workers) as pool:
                return self._gather(units, [self._task(u).submit(u, pool) for u in units])
        return self._gather(units, [self._task(u).submit(u) for u in units])

    def _gather(self, units: list[Unit], futures: list) -> list[Artifact]:
        out = []
        for unit, future in zip(units, futures):
            future.wait()
            self.tally.add(unit.stage, future.state.name)
            out.append(future.result())
        return out
