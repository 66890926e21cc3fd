"""Prefect tasks for the fusion's stages: one task per unit of stage work, no science here.

The stage folder is the only cache: a unit whose folder exists returns at once, and its task
ends in a ``Cached`` state, so the Prefect UI shows what was reused. Prefect's own result cache
is off (``NO_CACHE``): it kept paths apart from the folders, and after a work folder was deleted
it handed back paths that no longer existed. Steps that talk to the network (resolving and
fetching sources) retry with exponential backoff.

An error that ends a unit, a step or a stage carries where it happened (`failed_where`), so
that the command line can name the stage in its one-line report.
"""

from __future__ import annotations

from contextlib import contextmanager

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from fusellm.io.uris import NotThere
from fusellm.stages.base import Artifact, Unit, UnitPool
from fusellm.stages.pipeline import Executor, MlflowTracker

NETWORK_RETRIES = 3
NETWORK_BACKOFF = exponential_backoff(backoff_factor=5)  # 5, 10, 20 s (with jitter)
NETWORK_STEPS = {"resolve-sources", "fetch-model"}


def worth_retrying(task, task_run, state) -> bool:
    """A network step fails for a moment; a path or an S3 key that holds nothing fails every
    time."""
    return not isinstance(state.result(raise_on_failure=False), NotThere)


@task(cache_policy=NO_CACHE)
def run_unit(unit: Unit, pool=None):
    """Build one stage folder (or find it built): ``Cached`` when it already existed.

    `pool`: a `UnitPool` for CPU-bound units (align and fuse), to build past the GIL.
    """
    artifact = unit.run() if pool is None else pool.build(unit)
    if artifact.reused:
        return Completed(data=artifact, name="Cached", message=f"{unit.stage}/{unit.key} exists")
    return artifact


@task(cache_policy=NO_CACHE)
def run_step(fn, *args):
    return fn(*args)


WHERE_TASK = "fusellm_task"  # attributes of an error: the task run and the stage it ended
WHERE_STAGE = "fusellm_stage"


def mark_where(error: BaseException, attribute: str, name: str) -> None:
    """Record where `error` happened, unless a more precise place was recorded already."""
    if getattr(error, attribute, None) is None:
        try:
            setattr(error, attribute, name)
        except (AttributeError, TypeError):  # an exception type that refuses attributes
            pass


def failed_where(error: BaseException) -> str | None:
    """``stage prepare, task resolve-sources``, or what of it is known; None if nothing."""
    stage, task = getattr(error, WHERE_STAGE, None), getattr(error, WHERE_TASK, None)
    parts = ([f"stage {stage}"] if stage else []) + ([f"task {task}"] if task else [])
    return ", ".join(parts) or None


def _result(state, task: str):
    try:
        return state.result()
    except BaseException as error:
        mark_where(error, WHERE_TASK, task)
        raise


class StageTracker(MlflowTracker):
    """MLflow stage runs, and the stage now running: an error inside it names that stage."""

    @contextmanager
    def stage(self, name: str, params: dict | None = None):
        try:
            with super().stage(name, params) as run_id:
                yield run_id
        except BaseException as error:
            mark_where(error, WHERE_STAGE, name)
            raise


class PrefectExecutor(Executor):
    """Each unit a Prefect task (named after its stage); independent units run concurrently."""

    def __init__(self, tracker=None):
        """`tracker`: where stage numbers go (default: MLflow stage runs)."""
        super().__init__(tracker or StageTracker())

    def call(self, name: str, fn, *args):
        options = {"name": name, "task_run_name": name}
        if name in NETWORK_STEPS:
            options.update(
                retries=NETWORK_RETRIES,
                retry_delay_seconds=NETWORK_BACKOFF,
                retry_condition_fn=worth_retrying,
            )
        state = run_step.with_options(**options)(fn, *args, return_state=True)
        self.tally.add(name, state.name)
        return _result(state, name)

    def _task(self, unit: Unit):
        return run_unit.with_options(name=unit.stage, task_run_name=unit.label)

    def run(self, unit: Unit) -> Artifact:
        state = self._task(unit)(unit, return_state=True)
        self.tally.add(unit.stage, state.name)
        return _result(state, unit.label)

    def run_all(self, units: list[Unit], workers: int = 1) -> list[Artifact]:
        """All units as concurrent task runs; units meant for a process pool share a
        `UnitPool` of `workers` places (this process and spawned ones), so at most that many
        build at once."""
        if workers > 1 and units and all(u.in_process_pool for u in units):
            with UnitPool(workers) as pool:
                return self._gather(units, [self._task(u).submit(u, pool) for u in units])
        return self._gather(units, [self._task(u).submit(u) for u in units])

    def _gather(self, units: list[Unit], futures: list) -> list[Artifact]:
        out = []
        for unit, future in zip(units, futures):
            future.wait()
            self.tally.add(unit.stage, future.state.name)
            out.append(_result(future, unit.label))
        return out
