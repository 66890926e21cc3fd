"""Suites: named lm-eval groups (YAML under `tasks/`), resolved into runnable task specs.

A suite is data (`suites.yaml`): its lm-eval group, the built-in lm-eval task folders it reuses and
the metric its average is taken over. Resolving a suite expands the group to its leaf tasks,
drops MultiPL-E languages whose toolchain is missing (with the reason), and attaches each task's
data location, so nothing is loaded before every input is known to exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import yaml

from fusellm.evaluate.data import SPLIT_KEYS, EvalDataSource, TaskData, task_overrides

PACKAGE_DIR = Path(__file__).parent
TASKS_DIR = PACKAGE_DIR / "tasks"
SUITES_FILE = PACKAGE_DIR / "suites.yaml"
LANGUAGE_TASK_PREFIX = "multiple_"


@dataclass(frozen=True)
class Suite:
    """One evaluation suite as declared in suites.yaml."""

    name: str
    group: str
    folder: str
    builtin: tuple[str, ...] = ()
    primary_metric: str = "acc"
    higher_is_better: bool = True
    shipped_data: str | None = None

    @property
    def include_paths(self) -> list[Path]:
        import lm_eval.tasks

        builtin_root = Path(lm_eval.tasks.__file__).parent
        return [TASKS_DIR / self.folder] + [builtin_root / b for b in self.builtin]

    @property
    def shipped_data_dir(self) -> Path | None:
        return TASKS_DIR / self.shipped_data if self.shipped_data else None


@dataclass
class ResolvedSuite:
    """A suite ready for lm-eval: the group spec to load and the tasks left out, with reasons."""

    suite: Suite
    tasks: list[str]
    spec: dict
    skipped: dict[str, str] = field(default_factory=dict)


@lru_cache(maxsize=1)
def suites() -> dict[str, Suite]:
    """All suites declared in suites.yaml, by name."""
    raw = yaml.safe_load(SUITES_FILE.read_text())
    return {
        name: Suite(name=name, **{**fields, "builtin": tuple(fields.get("builtin", ()))})
        for name, fields in raw.items()
    }


def get_suite(name: str) -> Suite:
    """The suite called `name`; an error lists the known ones."""
    known = suites()
    if name not in known:
        raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(sorted(known))}")
    return known[name]


@cache
def task_manager(suite_name: str):
    """An lm-eval TaskManager indexing only this suite's folders (a full scan takes ~15 s)."""
    from lm_eval.tasks import TaskManager

    suite = get_suite(suite_name)
    return TaskManager(include_path=[str(p) for p in suite.include_paths], include_defaults=False)


def _raw_config(manager, name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise KeyError(f"lm-eval task or group {name!r} not found in {manager.include_path}")
    return load_yaml(entry.yaml_path, resolve_func=False)


def _group_defaults(raw_group: dict) -> dict:
    """Keys a group YAML sets for all its tasks (e.g. num_fewshot), as lm-eval applies them."""
    from lm_eval.tasks._factory import GROUP_FIELD_NAMES

    return {k: v for k, v in raw_group.items() if k not in GROUP_FIELD_NAMES}


def leaf_tasks(manager, name: str, defaults: dict | None = None) -> dict[str, dict]:
    """Expand a task or group into its leaf tasks, each with the defaults its groups set."""
    from lm_eval.tasks._index import Kind

    defaults = dict(defaults or {})
    entry = manager.task_index.get(name)
    if entry is None:
        raise KeyError(f"lm-eval task or group {name!r} not found in {manager.include_path}")
    if entry.kind != Kind.GROUP:
        return {name: defaults}
    raw = _raw_config(manager, name)
    defaults.update(_group_defaults(raw))
    leaves: dict[str, dict] = {}
    for member in raw.get("task", []):
        member_name = member if isinstance(member, str) else member["task"]
        extra = {} if isinstance(member, str) else {k: v for k, v in member.items() if k != "task"}
        leaves.update(leaf_tasks(manager, member_name, {**defaults, **extra}))
    return leaves


def task_data(manager, task: str, defaults: dict) -> TaskData:
    """The data fields (dataset path, name, splits) of one leaf task."""
    cfg = {**_raw_config(manager, task), **defaults}
    return TaskData(
        task=task,
        dataset_path=cfg.get("dataset_path", ""),
        dataset_name=cfg.get("dataset_name"),
        splits={key: cfg.get(key) for key in SPLIT_KEYS},
    )


def _skip_reason(task: str) -> str | None:
    if not task.startswith(LANGUAGE_TASK_PREFIX):
        return None
    from fusellm.evaluate.multiple import toolchain

    found = toolchain(task[len(LANGUAGE_TASK_PREFIX) :])
    return found if isinstance(found, str) else None


def resolve(
    suite_name: str, data: EvalDataSource | None = None, tasks: list[str] | None = None
) -> ResolvedSuite:
    """Everything needed to run `suite_name`, or a clear error naming what is missing.

    `tasks` restricts the run to some of the suite's leaf tasks (e.g. a few BBH subtasks).
    """
    suite = get_suite(suite_name)
    if data is None:
        shipped = suite.shipped_data_dir
        data = EvalDataSource(source="local", data_dir=shipped) if shipped else EvalDataSource()
    manager = task_manager(suite_name)
    group_raw = _raw_config(manager, suite.group)
    leaves = leaf_tasks(manager, suite.group)
    if tasks:
        unknown = sorted(set(tasks) - set(leaves))
        if unknown:
            raise ValueError(
                f"suite {suite_name!r} has no task(s) {', '.join(unknown)}; "
                f"its tasks are {', '.join(leaves)}"
            )
        leaves = {name: leaves[name] for name in leaves if name in tasks}
    skipped = {name: reason for name in leaves if (reason := _skip_reason(name))}
    runnable = {name: d for name, d in leaves.items() if name not in skipped}
    if not runnable:
        raise ValueError(f"suite {suite_name!r}: no task can run here: {skipped}")
    items = [task_data(manager, name, d) for name, d in runnable.items()]
    overrides = task_overrides(suite_name, items, data)
    members = [{**runnable[name], "task": name, **overrides[name]} for name in runnable]
    spec = {"group": suite.group, "task": members}
    if "aggregate_metric_list" in group_raw:
        spec["aggregate_metric_list"] = group_raw["aggregate_metric_list"]
    return ResolvedSuite(suite=suite, tasks=list(runnable), spec=spec, skipped=skipped)
