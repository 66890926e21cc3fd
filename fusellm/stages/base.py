"""Content-addressed stage folders: the one cache of every fusion stage.

Every stage writes to ``<workdir>/<stage>/<key>``. The key hashes the stage's code version,
the content identities of its inputs and the parameters that change its result
(`stage_key`); each stage computes it in exactly one function, next to the code that builds
it. The folder is built under a temporary name (``.<key>.partial``) and renamed when
complete, with ``stage.json`` inside saying what it holds; if the folder exists the stage
returns at once. So a re-run recomputes only what changed, a killed stage never leaves a
folder that looks finished, and deleting a work folder simply recomputes it: no other cache
(Prefect's included) can hand back a path that no longer exists. The partial name is stable
on purpose: extraction, fusion and training resume from what an interrupted attempt left.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from fusellm.io.files import exclusive_lock, write_json_atomic
from fusellm.io.fingerprint import sha256_json
from fusellm.io.sources import ModelRef
from fusellm.stages import versions

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


class StageError(RuntimeError):
    """A stage's input is missing or inconsistent; the message names the folder or field."""


def stage_key(stage: str, **parts) -> str:
    """Content key of a stage output: its code version, library versions, inputs, parameters."""
    return sha256_json(
        {
            "stage": stage,
            "version": versions.version(stage),
            "libraries": versions.libraries(stage),
            **parts,
        }
    )[:24]


@dataclass(frozen=True)
class Artifact:
    """A stage output: which stage, its content key, its folder, and what `stage.json` says.

    `reused`: the folder existed before this run asked for it. `done`: False only for the
    answers of a plan, which looks at folders without building them.
    """

    stage: str
    key: str
    path: Path
    info: dict = field(default_factory=dict, compare=False)
    reused: bool = field(default=False, compare=False)
    done: bool = field(default=True, compare=False)


def stage_path(workdir: Path, stage: str, key: str) -> Path:
    return Path(workdir) / stage / key


def is_done(workdir: Path, stage: str, key: str) -> bool:
    return (stage_path(workdir, stage, key) / STAGE_FILE).is_file()


def _finished(final: Path, stage: str, key: str) -> Artifact:
    info = json.loads((final / STAGE_FILE).read_text())["info"]
    return Artifact(stage, key, final, info, reused=True)


HASHED_UP_TO = 1 << 20  # files this small are hashed in the stage record, larger ones sized


def file_record(folder: Path) -> dict[str, dict]:
    """Every file of a built folder: its size, and its sha256 when small (maps, tables, JSON).

    Large files (store shards, weights) get their size only: hashing them on every reuse would
    cost minutes at the paper's scale, and their readers verify their own checksums on read.
    """
    from fusellm.io.files import sha256_file

    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STAGE_FILE):
        size = path.stat().st_size
        entry = {"size": size}
        if size <= HASHED_UP_TO:
            entry["sha256"] = sha256_file(path)
        out[str(path.relative_to(folder))] = entry
    return out


def damage(final: Path) -> str | None:
    """What no longer matches the stage record's files (missing, resized, changed), or None."""
    from fusellm.io.files import sha256_file

    try:
        record = json.loads((final / STAGE_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return f"{final / STAGE_FILE} is unreadable"
    if record is None:  # written before files were recorded
        return None
    for name, entry in record.items():
        path = final / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{path} has {path.stat().st_size} bytes, {entry['size']} when built"
        if "sha256" in entry and sha256_file(path) != entry["sha256"]:
            return f"{path} changed since it was built (sha256)"
    return None


def quarantine(final: Path) -> Path:
    """Move a damaged stage folder aside (``.<key>.corrupt``), out of every later run's way."""
    aside = final.with_name(f".{final.name}.corrupt")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(final, aside)
    return aside


def _corrupt_cause(err: BaseException):
    """The `CorruptFileError` behind an error, if any (following the exception chain)."""
    from fusellm.io.files import CorruptFileError

    seen = err
    while seen is not None:
        if isinstance(seen, CorruptFileError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _stage_folder_of(path: Path, workdir: Path) -> Path | None:
    """The finished stage folder (<workdir>/<stage>/<key>) that holds `path`, if any."""
    try:
        parts = Path(path).resolve().relative_to(Path(workdir).resolve()).parts
    except ValueError:
        return None
    if len(parts) < 3:
        return None
    folder = Path(workdir) / parts[0] / parts[1]
    return folder if (folder / STAGE_FILE).is_file() else None


def _drop_dead_writes(partial: Path) -> None:
    """Delete the temporary files a killed build left in the partial folder it hands on
    (``.<name>.<random>.tmp`` of `fusellm.io.files`, ``.<name>.tmp-<pid>...`` of the store and
    vocabulary writers): under the key's lock no one else writes there, and the folder must not
    carry them into its finished place."""
    for pattern in (".*.tmp", ".*.tmp-*"):
        for leftover in partial.rglob(pattern):
            if leftover.is_file():
                leftover.unlink()


def build_stage(workdir: Path, stage: str, key: str, build: Callable[[Path], dict]) -> Artifact:
    """Return the finished folder for (stage, key), building it first if it does not exist.

    Built once, whoever asks: a build holds the key's lock (`exclusive_lock`), so a second run of the
    same fusion, or a second thread, waits and then finds the folder finished. The build writes
    into ``.<key>.partial``, renamed into place only when complete; an interrupted build's
    partial folder is handed to the next build of the key, which resumes from it (training
    resumes from its checkpoints there).
    """
    final = stage_path(workdir, stage, key)
    if (final / STAGE_FILE).is_file() and not damage(final):
        return _finished(final, stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(final.with_name(f".{key}.lock")):
        if (final / STAGE_FILE).is_file():  # built by whoever held the lock before us
            problem = damage(final)
            if problem is None:
                return _finished(final, stage, key)
            log.warning(
                "%s %s: %s; rebuilding it (old folder: %s)", stage, key, problem, quarantine(final)
            )
        partial = final.with_name(f".{key}.partial")
        partial.mkdir(exist_ok=True)
        _drop_dead_writes(partial)
        started = time.perf_counter()
        try:
            info = build(partial) or {}
        except Exception as err:
            _set_aside_what_is_corrupt(err, workdir)
            raise
        record = {
            "stage": stage,
            "key": key,
            "seconds": time.perf_counter() - started,
            "info": info,
            "files": file_record(partial),
        }
        write_json_atomic(partial / STAGE_FILE, record)
        if final.exists():  # a folder without its record is not a finished build
            shutil.rmtree(final)
        os.replace(partial, final)
    log.info("%s %s built in %.1f s", stage, key, record["seconds"])
    return Artifact(stage, key, final, info)


def _set_aside_what_is_corrupt(err: Exception, workdir: Path) -> None:
    """When a build failed reading a damaged file of another stage folder, move that folder
    aside, and every finished folder holding a hard link to the same file (merged stores link
    their shards), and say so in the error: the next run recomputes them, and only them."""
    cause = _corrupt_cause(err)
    folder = None if cause is None else _stage_folder_of(cause.path, workdir)
    if folder is None:
        return
    try:
        folders = [folder, *_folders_linking(cause.path, workdir, besides=folder)]
        moved = [f"{f} (now {aside.name})" for f in folders if (aside := _set_aside(f))]
    except OSError as trouble:  # never hide the error that brought us here
        log.error("%s: could not move its stage folder aside (%s)", cause.path, trouble)
        return
    note = f"moved aside: {', '.join(moved) or 'already done by another unit'}; run again"
    err.add_note(note)
    log.error("%s: %s", cause.path, note)


def _set_aside(folder: Path) -> Path | None:
    """`quarantine` under the folder's own key lock; None when another unit already did it."""
    with exclusive_lock(folder.with_name(f".{folder.name}.lock")):
        if not (folder / STAGE_FILE).is_file():
            return None
        return quarantine(folder)


def _folders_linking(path: Path, workdir: Path, *, besides: Path) -> list[Path]:
    """Other finished stage folders with a hard link to the file at `path`."""
    try:
        stat = Path(path).stat()
    except OSError:
        return []
    if stat.st_nlink < 2:
        return []
    found = set()
    for record in Path(workdir).glob(f"*/*/{STAGE_FILE}"):
        folder = record.parent
        if folder == besides or folder.name.startswith("."):
            continue
        for file in folder.rglob("*"):
            try:
                other = file.stat()
            except OSError:
                continue
            if (other.st_ino, other.st_dev) == (stat.st_ino, stat.st_dev):
                found.add(folder)
                break
    return sorted(found)


@dataclass(frozen=True)
class Unit:
    """One unit of stage work: what it is, its content key, and how to build it.

    Stage modules make units (key and build side by side); an executor decides how a unit
    runs (in this process, as a Prefect task) or only looks whether it is done (a plan).
    """

    stage: str
    key: str
    label: str
    workdir: Path
    build: Callable[[Path], dict] = field(repr=False, compare=False)
    # CPU-bound Python (align and fuse): run in a worker process, past the GIL. Such a unit's
    # `build` must pickle (a module-level function with its arguments, no closure).
    in_process_pool: bool = False
    # Keys of the units whose folders this one reads: a plan names them when they change.
    inputs: tuple[str, ...] = field(default=(), compare=False)
    # What names this unit to a process that rebuilds it from the config alone: a flow run of
    # a unit deployment on another machine (`flows/dispatch.py`), e.g. {"model": .., "shard": ..}.
    spec: dict = field(default_factory=dict, compare=False)

    def run(self) -> Artifact:
        return build_stage(self.workdir, self.stage, self.key, self.build)

    def peek(self) -> Artifact:
        """The artifact if its folder is finished, else a not-done answer (nothing is built)."""
        final = stage_path(self.workdir, self.stage, self.key)
        if (final / STAGE_FILE).is_file():
            return _finished(final, self.stage, self.key)
        return Artifact(self.stage, self.key, final, {}, done=False)


def process_pool(workers: int):
    """Worker processes for CPU-bound units: spawned, so nothing of this process's threads,
    locks or open files leaks into them; a unit's arguments travel by pickle."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def build_in_pool(pool, unit: Unit) -> Artifact:
    """Build one unit in a worker process (or find it built); its folder is the result."""
    if is_done(unit.workdir, unit.stage, unit.key):
        return unit.run()
    pool.submit(_run_unit, unit).result()  # re-raises the worker's error
    done = unit.peek()
    return Artifact(done.stage, done.key, done.path, done.info)


class UnitPool:
    """`workers` places to build CPU-bound units at once: this process and `workers - 1`
    spawned ones.

    This process has its imports and tokenizers loaded already and starts at once; a spawned
    process first pays a few seconds of imports (transformers, torch) before its first unit.
    Any number of threads may call `build`: at most `workers` build at a time, one of them here.
    Use it as a context manager, which stops the processes.
    """

    def __init__(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        if workers < 2:
            raise ValueError(f"a unit pool needs at least 2 workers, got {workers}")
        self._slots = threading.Semaphore(workers)
        self._here = threading.Lock()
        # Units built here run on one long-lived thread, whichever caller's turn it is: the
        # tokenizers it loads (`tokenizer_of`, per thread) are loaded once, not once per caller.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="unit-pool")
        self._processes = process_pool(workers - 1)

    def build(self, unit: Unit) -> Artifact:
        with self._slots:
            if self._here.acquire(blocking=False):
                try:
                    return self._thread.submit(unit.run).result()
                finally:
                    self._here.release()
            return build_in_pool(self._processes, unit)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._processes.shutdown(wait=True, cancel_futures=True)


def run_units_in_pool(units: list[Unit], workers: int) -> list[Artifact]:
    """Build units in up to `workers` places at once (`UnitPool`); results in the order given."""
    from concurrent.futures import ThreadPoolExecutor

    with UnitPool(workers) as pool, ThreadPoolExecutor(workers) as waiters:
        return list(waiters.map(pool.build, units))


def _run_unit(unit: Unit) -> str:
    unit.run()
    return unit.key


# ---------------------------------------------------------------------------------------------
# Models as the stages see them


@dataclass(frozen=True)
class ModelFiles:
    """A model as the stages see it: its name, ref, local folder and content identities."""

    name: str
    ref: ModelRef
    path: Path
    identity: str  # of the files (sources.resolve), plus how they are loaded
    tokenizer: str  # tokenizer fingerprint: pieces and vocabulary maps depend on this only


_loaded = threading.local()  # per thread: a fast tokenizer must not be shared across threads


def tokenizer_of(model: ModelFiles):
    """The model's tokenizer, loaded once per process and thread.

    Every extraction and fusion unit needs the same few tokenizers; loading a fresh one each time
    leaves memory behind (a byte-level BPE keeps ~5 MB after it is dropped), which grows with the
    number of shards, ~25 GB at the paper's scale in one long-lived worker.
    """
    from fusellm.io.sources import load_tokenizer

    cache = _loaded.__dict__.setdefault("tokenizers", {})
    key = (str(model.path), model.ref, model.tokenizer)
    if key not in cache:
        cache[key] = load_tokenizer(model.path, model.ref)
    return cache[key]


def frame_of(model: ModelFiles):
    """The tokens around each piece for this model: its tokenizer's, unless the config says."""
    from fusellm.data.framing import document_frame

    return document_frame(tokenizer_of(model), model.ref.document_start, model.ref.document_end)


def cores() -> int:
    """The cores this process may use (its CPU affinity: a container's or a batch job's
    allowance), not the host's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def device_for(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice
