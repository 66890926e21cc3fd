"""Suites: named lm-eval groups (YAML under `tasks/`), resolved into runnable task specs.

A suite is data (`suites.yaml`): its lm-eval group, the built-in lm-eval task folders it reuses and
the metric its average is taken over. Resolving a suite expands the group to its leaf tasks,
drops MultiPL-E languages whose toolchain is missing (with the reason), and attaches each task's
data location, so nothing is loaded before every input is known to exist.

Two suites are shaped by their inputs: `local` has a task per domain folder of its data
(`<data_dir>/fusellm/local/<domain>/test.jsonl`), and `custom` runs the lm-eval tasks and
groups a configuration names (`CustomTasks`: any of lm-eval's, or the user's own YAML folder).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import yaml

from fusellm.evaluate.data import SPLIT_KEYS, EvalDataSource, TaskData, task_overrides

PACKAGE_DIR = Path(__file__).parent
TASKS_DIR = PACKAGE_DIR / "tasks"
SUITES_FILE = PACKAGE_DIR / "suites.yaml"
LANGUAGE_TASK_PREFIX = "multiple_"
CUSTOM = "custom"  # the suite of the tasks a configuration names
LOCAL = "local"
LOCAL_TASK_PREFIX = "fusellm_local_"
LOCAL_DOMAINS = ("docs", "code", "docstrings")  # the demo's domains: first, in this order
LOCAL_MC = "mc"  # multiple choice from held-out text, not a text domain
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Suite:
    """One evaluation suite as declared in suites.yaml."""

    name: str
    group: str
    folder: str | None = None
    builtin: tuple[str, ...] = ()
    primary_metric: str = "acc"
    higher_is_better: bool = True
    shipped_data: str | None = None

    @property
    def include_paths(self) -> list[Path]:
        import lm_eval.tasks

        builtin_root = Path(lm_eval.tasks.__file__).parent
        own = [TASKS_DIR / self.folder] if self.folder else []
        return own + [builtin_root / b for b in self.builtin]

    @property
    def shipped_data_dir(self) -> Path | None:
        return TASKS_DIR / self.shipped_data if self.shipped_data else None


@dataclass(frozen=True)
class CustomTasks:
    """What the `custom` suite runs: lm-eval task or group names, and a folder of the user's
    own task YAMLs indexed beside lm-eval's (`evaluation.tasks`, `evaluation.task_dir`)."""

    names: tuple[str, ...]
    task_dir: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names))
        if self.task_dir is not None:
            object.__setattr__(self, "task_dir", Path(self.task_dir))


@dataclass
class ResolvedSuite:
    """A suite ready for lm-eval: the group spec to load and the tasks left out, with reasons.

    include_paths / include_defaults: what the TaskManager that runs it indexes; task_configs:
    task YAMLs made here (a `local` domain without a file of its own), written beside the spec;
    entries: for `custom`, each named task or group -> its leaf tasks; datasets: where each
    task's data is declared (the Hub or a datasets cache: it keys the evaluation).
    """

    suite: Suite
    tasks: list[str]
    spec: dict
    skipped: dict[str, str] = field(default_factory=dict)
    include_paths: list[Path] = field(default_factory=list)
    include_defaults: bool = False
    task_configs: dict[str, dict] = field(default_factory=dict)
    entries: dict[str, list[str]] = field(default_factory=dict)
    datasets: dict[str, TaskData] = field(default_factory=dict)


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
    if entry.kind == Kind.TAG:  # a tag names tasks; it sets nothing for them
        return {task: dict(defaults) for task in sorted(entry.tags)}
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


def local_domains(data_dir: Path) -> list[str]:
    """The text domains of the `local` suite: each `<data_dir>/fusellm/local/<domain>/test.jsonl`
    but the multiple-choice `mc`; the demo's domains first in their order, then by name."""
    root = data_dir / "fusellm" / LOCAL
    found = sorted(p.parent.name for p in root.glob("*/test.jsonl") if p.is_file())
    found = [d for d in found if d != LOCAL_MC]
    bad = [d for d in found if not _DOMAIN_NAME.fullmatch(d)]
    if bad:
        from fusellm.evaluate.data import DataError

        raise DataError(
            f"suite 'local': domain folder names become task names; rename {bad} under {root} "
            "(letters, digits, '_', '.', '-')"
        )
    return [d for d in LOCAL_DOMAINS if d in found] + [d for d in found if d not in LOCAL_DOMAINS]


def _local_leaves(manager, data: EvalDataSource) -> tuple[dict[str, dict], dict[str, dict]]:
    """The `local` suite's tasks for `data`, and the task configs to make for new domains.

    A local folder decides the tasks: a bits-per-byte task per domain folder (the package has
    files for docs, code and docstrings; others are made from the same template), and the
    multiple-choice task when `mc` has data. A folder with no domain, or data elsewhere, keeps
    the declared tasks, so what is missing is named.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    declared = leaf_tasks(manager, get_suite(LOCAL).group)
    if data.source != "local" or data.data_dir is None:
        return declared, {}
    domains = local_domains(data.data_dir)
    if not domains:
        return declared, {}
    leaves: dict[str, dict] = {}
    made: dict[str, dict] = {}
    template = load_yaml(TASKS_DIR / LOCAL / "_local_bpb_template_yaml", resolve_func=False)
    for domain in domains:
        name = f"{LOCAL_TASK_PREFIX}{domain}"
        leaves[name] = {}
        if name not in manager.task_index:
            made[name] = {**template, "task": name, "dataset_name": domain}
    mc = f"{LOCAL_TASK_PREFIX}{LOCAL_MC}"
    if (data.data_dir / "fusellm" / LOCAL / LOCAL_MC / "test.jsonl").is_file():
        leaves[mc] = declared.get(mc, {})
    return leaves, made


def _folder_files(folder: Path) -> list[Path]:
    def hidden(path: Path) -> bool:
        return any(p.startswith(".") or p == "__pycache__" for p in path.relative_to(folder).parts)

    return sorted(p for p in folder.rglob("*") if p.is_file() and not hidden(p))


def folder_identity(folder: Path) -> str:
    """SHA-256 over a folder's files (relative paths and contents): a task folder's identity."""
    import hashlib

    from fusellm.io.files import sha256_file

    digest = hashlib.sha256()
    for path in _folder_files(folder):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


@cache
def _custom_manager(task_dir: str | None, identity: str | None, defaults: bool):
    """A TaskManager over the user's folder, with lm-eval's own tasks when `defaults`
    (a full scan: ~15 s). `identity`: the folder's content, so an edited folder is re-read."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[task_dir] if task_dir else None, include_defaults=defaults)


def custom_manager(custom: CustomTasks) -> tuple[object, bool]:
    """The TaskManager that knows every name of `custom`, and whether it holds lm-eval's own
    tasks: the user's folder alone when it has them all, else lm-eval's tasks too. Unknown
    names are an error listing close matches."""
    task_dir = custom.task_dir
    if task_dir is not None and not task_dir.is_dir():
        raise ValueError(f"evaluation.task_dir: {task_dir} is not a folder of lm-eval task YAMLs")
    folder = str(task_dir) if task_dir is not None else None
    identity = folder_identity(task_dir) if task_dir is not None else None
    if folder is not None:
        manager = _custom_manager(folder, identity, False)
        if all(name in manager.task_index for name in custom.names):
            return manager, False
    manager = _custom_manager(folder, identity, True)
    unknown = [name for name in custom.names if name not in manager.task_index]
    if unknown:
        where = "lm-eval" + (f" or {task_dir}" if task_dir is not None else "")
        lines = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}" if close else "no close match"
            lines.append(f"{name!r} ({hint})")
        raise ValueError(
            f"evaluation.tasks: no task or group in {where} is called "
            + "; ".join(lines)
            + " (`lm-eval ls tasks` lists lm-eval's)"
        )
    return manager, True


def _custom_leaves(manager, custom: CustomTasks) -> tuple[dict[str, dict], dict[str, list[str]]]:
    if not custom.names:
        raise ValueError("suite 'custom' runs evaluation.tasks, and it names no task")
    if len(set(custom.names)) != len(custom.names):
        raise ValueError(f"evaluation.tasks: names listed twice: {list(custom.names)}")
    leaves: dict[str, dict] = {}
    entries: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name in custom.names:
        found = leaf_tasks(manager, name)
        twice = sorted(set(found) & set(leaves))
        if twice:
            raise ValueError(
                f"evaluation.tasks: {name!r} and {owner[twice[0]]!r} both run {', '.join(twice)}; "
                "name each task once"
            )
        leaves.update(found)
        entries[name] = list(found)
        owner.update(dict.fromkeys(found, name))
    return leaves, entries


def _own_data_files(manager, task: str, defaults: dict) -> dict | None:
    """A task's own `dataset_kwargs.data_files` (e.g. `dataset_path: json`), made absolute: a
    relative path is read from the task YAML's folder. None when the task names no files."""
    cfg = {**_raw_config(manager, task), **defaults}
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if not files:
        return None
    base = Path(manager.task_index[task].yaml_path).parent

    def place(value):
        if isinstance(value, list):
            return [place(v) for v in value]
        if not isinstance(value, str) or "://" in value or Path(value).is_absolute():
            return value
        return str(base / value) if (base / value).exists() else value

    if isinstance(files, dict):
        files = {split: place(v) for split, v in files.items()}
    else:
        files = place(files)
    return {"dataset_kwargs": {**kwargs, "data_files": files}}


def resolve(
    suite_name: str,
    data: EvalDataSource | None = None,
    tasks: list[str] | None = None,
    custom: CustomTasks | None = None,
) -> ResolvedSuite:
    """Everything needed to run `suite_name`, or a clear error naming what is missing.

    `tasks` restricts the run to some of the suite's leaf tasks (e.g. a few BBH subtasks);
    `custom`: what the `custom` suite runs (required for it).
    """
    suite = get_suite(suite_name)
    if data is None:
        shipped = suite.shipped_data_dir
        data = EvalDataSource(source="local", data_dir=shipped) if shipped else EvalDataSource()
    made: dict[str, dict] = {}
    entries: dict[str, list[str]] = {}
    own_data: dict[str, dict] = {}
    include_paths, include_defaults = list(suite.include_paths), False
    if suite_name == CUSTOM:
        if custom is None:
            raise ValueError(
                "suite 'custom' runs the tasks a configuration names: give them "
                "(evaluation.tasks, evaluation.task_dir)"
            )
        manager, include_defaults = custom_manager(custom)
        include_paths = [custom.task_dir] if custom.task_dir is not None else []
        group_raw: dict = {}
        leaves, entries = _custom_leaves(manager, custom)
    else:
        manager = task_manager(suite_name)
        group_raw = _raw_config(manager, suite.group)
        if suite_name == LOCAL:
            leaves, made = _local_leaves(manager, data)
        else:
            leaves = leaf_tasks(manager, suite.group)
    if tasks:
        unknown = sorted(set(tasks) - set(leaves))
        if unknown:
            raise ValueError(
                f"suite {suite_name!r} has no task(s) {', '.join(unknown)}; "
                f"its tasks are {', '.join(leaves)}"
            )
        leaves = {name: leaves[name] for name in leaves if name in tasks}
        entries = {
            e: [t for t in members if t in leaves]
            for e, members in entries.items()
            if any(t in leaves for t in members)
        }
    skipped = {name: reason for name in leaves if (reason := _skip_reason(name))}
    runnable = {name: d for name, d in leaves.items() if name not in skipped}
    if not runnable:
        raise ValueError(f"suite {suite_name!r}: no task can run here: {skipped}")
    if suite_name == CUSTOM:  # tasks that name their own files read them, wherever data is
        for name, d in runnable.items():
            if (files := _own_data_files(manager, name, d)) is not None:
                own_data[name] = files
    items = [
        _made_task_data(name, made[name]) if name in made else task_data(manager, name, d)
        for name, d in runnable.items()
        if name not in own_data
    ]
    overrides = {**task_overrides(suite_name, items, data), **own_data}
    members = [{**runnable[name], "task": name, **overrides[name]} for name in runnable]
    spec = {"group": suite.group, "task": members}
    if "aggregate_metric_list" in group_raw:
        spec["aggregate_metric_list"] = group_raw["aggregate_metric_list"]
    return ResolvedSuite(
        suite=suite,
        tasks=list(runnable),
        spec=spec,
        skipped=skipped,
        include_paths=include_paths,
        include_defaults=include_defaults,
        task_configs={name: cfg for name, cfg in made.items() if name in runnable},
        entries=entries,
        datasets={item.task: item for item in items},
    )


def _made_task_data(task: str, cfg: dict) -> TaskData:
    return TaskData(
        task=task,
        dataset_path=cfg.get("dataset_path", ""),
        dataset_name=cfg.get("dataset_name"),
        splits={key: cfg.get(key) for key in SPLIT_KEYS},
    )
