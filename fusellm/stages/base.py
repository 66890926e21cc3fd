"""The fusion stages as plain functions over content-addressed folders (no orchestration here).

Every stage writes to ``<workdir>/<stage>/<key>``, where the key hashes the code version, the
content identities of the stage's inputs and its parameters. The folder is built under a
temporary name (``.<key>.partial``) and renamed when complete, with ``stage.json`` inside saying
what it holds; if the folder exists the stage returns at once. So a re-run recomputes only what
changed, a killed stage never leaves a folder that looks finished, and the same keys serve as
the orchestrator's cache keys. The partial name is stable on purpose: extraction, fusion and
training resume from what an interrupted attempt left there.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fusellm.io.fingerprint import sha256_json
from fusellm.io.sources import ModelRef, write_json_atomic

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


class StageError(RuntimeError):
    """A stage's input is missing or inconsistent; the message names the folder or field."""


# ---------------------------------------------------------------------------------------------
# Keys and folders


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of the library's own source and data files: new code never reuses old outputs."""
    root = Path(__file__).resolve().parent
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml", ".yml") and "__pycache__" not in p.parts
    )
    return sha256_json({p.relative_to(root).as_posix(): p.read_bytes().hex() for p in files})[:16]


def stage_key(stage: str, **parts) -> str:
    """Content key of a stage output: code version + inputs' identities + parameters."""
    return sha256_json({"stage": stage, "code": code_hash(), **parts})[:24]


@dataclass(frozen=True)
class Artifact:
    """A finished stage output: which stage, its content key, and the folder holding it."""

    stage: str
    key: str
    path: Path
    info: dict = field(default_factory=dict, compare=False)


def stage_path(workdir: Path, stage: str, key: str) -> Path:
    return Path(workdir) / stage / key


def is_done(workdir: Path, stage: str, key: str) -> bool:
    return (stage_path(workdir, stage, key) / STAGE_FILE).is_file()


def build_stage(workdir: Path, stage: str, key: str, build: Callable[[Path], dict]) -> Artifact:
    """Return the finished folder for (stage, key), building it first if it does not exist."""
    final = stage_path(workdir, stage, key)
    if (final / STAGE_FILE).is_file():
        info = json.loads((final / STAGE_FILE).read_text())["info"]
        return Artifact(stage, key, final, info)
    partial = final.with_name(f".{key}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = build(partial) or {}
    record = {"stage": stage, "key": key, "seconds": time.perf_counter() - started, "info": info}
    write_json_atomic(partial / STAGE_FILE, record)
    if final.exists():  # another process finished the same work first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    else:
        os.replace(partial, final)
    log.info("%s %s built in %.1f s", stage, key, record["seconds"])
    return Artifact(stage, key, final, info)


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class ModelFiles:
    """A model as the stages see it: its name, ref, local folder and content identities."""

    name: str
    ref: ModelRef
    path: Path
    identity: str  # of the files (sources.resolve), plus how they are loaded
    tokenizer: str  # tokenizer fingerprint: pieces and vocabulary maps depend on this only


def tokenizer_of(model: ModelFiles):
    from fusellm.io.sources import load_tokenizer

    return load_tokenizer(model.path, model.ref)


def device_for(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice
