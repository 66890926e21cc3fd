"""Where each evaluation task reads its data: the Hub, a pre-filled datasets cache, or local JSONL.

Local files mirror the Hub: task data for `dataset_path` P and `dataset_name` N lives in
`<data_dir>/P/N/<split>.jsonl` (or `<data_dir>/P/<split>.jsonl` when N is empty), with the Hub
dataset's own field names. So the same lm-eval task configuration works online and offline, and a
folder is filled by exporting the Hub datasets once (`Dataset.to_json`). Every problem is found
before any model is loaded and reported together, naming the suite and the files to provide.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, model_validator

SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
_TRUE = {"1", "ON", "YES", "TRUE"}


class DataError(ValueError):
    """The data a suite needs is not where the configuration says it is."""


class EvalDataSource(BaseModel):
    """Where a suite's data comes from.

    source: "hub" downloads with `datasets` (needs network), "cache" reads a pre-filled datasets
    cache offline (`cache_dir`, default the usual HF cache), "local" reads JSONL files in the Hub
    layout under `data_dir`. Default: "local" when `data_dir` is given, else "hub".
    """

    source: Literal["hub", "cache", "local"] | None = None
    data_dir: Path | None = None
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _default_source(self) -> EvalDataSource:
        if self.source is None:
            self.source = "local" if self.data_dir is not None else "hub"
        if self.source == "local" and self.data_dir is None:
            raise ValueError("data source 'local' needs data_dir (a folder of JSONL files)")
        return self


@dataclass(frozen=True)
class TaskData:
    """The data fields of one lm-eval task configuration."""

    task: str
    dataset_path: str
    dataset_name: str | None
    splits: dict[str, str | None]  # SPLIT_KEYS -> split name

    def local_folder(self, data_dir: Path) -> Path:
        folder = data_dir / self.dataset_path
        return folder / self.dataset_name if self.dataset_name else folder

    @property
    def eval_split(self) -> str | None:
        return self.splits.get("test_split") or self.splits.get("validation_split")


def hub_offline(timeout: float = 3.0) -> bool:
    """True when the Hub cannot be used: offline mode is set, or its host does not answer.

    Checked up front so that an offline run fails at once with a useful message rather than
    after the model has been loaded.
    """
    if any(
        os.environ.get(var, "").upper() in _TRUE
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return True
    return False


def _local_overrides(item: TaskData, data_dir: Path) -> tuple[dict, list[str]]:
    """Point the task at JSON files; splits without a file are switched off, except the one
    we evaluate on, whose absence is the problem reported."""
    folder = item.local_folder(data_dir)
    eval_key = "test_split" if item.splits.get("test_split") else "validation_split"
    files, overrides = {}, {}
    for key in SPLIT_KEYS:
        split = item.splits.get(key)
        if split is None:
            continue
        path = folder / f"{split}.jsonl"
        if path.is_file():
            files[split] = str(path)
        elif key != eval_key:
            overrides[key] = None
    problems = []
    if item.eval_split not in files:
        wanted = folder / f"{item.eval_split or 'test'}.jsonl"
        problems.append(f"{item.task}: missing {wanted}")
    overrides.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    return overrides, problems


def _cache_has(item: TaskData, cache_dir: Path) -> bool:
    if "/" not in item.dataset_path:
        wanted = item.dataset_path.lower()
    else:
        namespace, name = item.dataset_path.split("/", 1)
        wanted = f"{namespace}___{name}".lower()
    return cache_dir.is_dir() and any(p.name.lower() == wanted for p in cache_dir.iterdir())


def default_cache_dir() -> Path:
    from datasets import config

    return Path(config.HF_DATASETS_CACHE)


def task_overrides(suite: str, items: list[TaskData], data: EvalDataSource) -> dict[str, dict]:
    """lm-eval config overrides per task for `data`; raises DataError listing everything missing."""
    problems: list[str] = []
    overrides: dict[str, dict] = {}
    offline = None
    for item in items:
        if data.source == "local":
            overrides[item.task], missing = _local_overrides(item, data.data_dir)
            problems += missing
        elif item.dataset_path.startswith("fusellm/"):
            problems.append(f"{item.task}: project-local data only, give a data folder")
        elif data.source == "cache":
            cache = data.cache_dir or default_cache_dir()
            if not _cache_has(item, cache):
                problems.append(f"{item.task}: {item.dataset_path} is not in the cache {cache}")
            overrides[item.task] = (
                {"dataset_kwargs": {"cache_dir": str(data.cache_dir)}} if data.cache_dir else {}
            )
        else:
            if offline is None:
                offline = hub_offline()
            if offline:
                problems.append(f"{item.task}: needs {item.dataset_path} from the Hub")
            overrides[item.task] = {}
    if problems:
        if data.source == "local":
            hint = (
                f"provide JSONL files with the Hub datasets' field names under {data.data_dir} "
                "(<dataset_path>/<dataset_name>/<split>.jsonl)"
            )
        elif data.source == "cache":
            hint = "fill the datasets cache online first, or use a local data folder (--data-dir)"
        elif offline:
            hint = (
                "the Hub is unreachable (offline): give a local data folder (--data-dir) "
                "or a pre-filled datasets cache"
            )
        else:
            hint = "its data is not on the Hub: give a local data folder (--data-dir)"
        raise DataError(
            f"suite {suite!r} ({data.source} data) cannot run: {hint}.\n  " + "\n  ".join(problems)
        )
    return overrides


@contextmanager
def offline_if(enabled: bool):
    """Make `datasets` read its cache without trying the network while a cached suite runs."""
    if not enabled:
        yield
        return
    from datasets import config

    saved = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE = saved
