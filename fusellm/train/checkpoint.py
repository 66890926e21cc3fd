"""Crash-safe checkpoints that resume exactly: weights, optimizer, scheduler, RNG, data position.

Layout under `<output>/checkpoints/`:

    step-00000010/ds/...        DeepSpeed's own files (module, ZeRO partitions, scheduler)
    step-00000010/rng-rank0.pt  RNG states of each rank (torch, CUDA, numpy, python)
    step-00000010/trainer_state.json   step, world size, config (read before a resume builds
                                       anything, so an incompatible resume fails at once)
    step-00000010/files.json    sha256 of every other file, written last
    latest                      name of the newest complete checkpoint

A checkpoint is written into `.tmp-step-...` by all ranks, then renamed by rank 0 once every
rank is done, then `latest` is replaced atomically, then old ones are pruned. A kill at any
moment leaves `latest` naming a complete checkpoint (or no `latest` at all); leftover temporary
folders are ignored and removed by the next save. The data position needs no file: the order is
a function of the step (`fusellm.train.data.DataOrder`), which DeepSpeed's client state holds.
A resume checks the checkpoint against `files.json` first: a damaged one (a flipped byte, a
truncated or missing file) is passed over, with a warning naming the file, for the newest
earlier checkpoint that is intact, or a start from step 0; the weights still end equal.
This layout assumes a filesystem shared by all ranks (one node, or NFS/Lustre across nodes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fusellm.io.files import write_text_atomic

TAG = "ds"
LATEST = "latest"
STATE = "trainer_state.json"
SUMS = "files.json"
log = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint up to the one `latest` names, or None to start over.

    Damaged checkpoints are passed over with a warning, not deleted: every rank calls this, and
    the next save of the same step replaces the folder anyway.
    """
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = Path(root) / name
    if not _NAME.match(name):
        raise RuntimeError(f"{pointer}: names {name!r}, which is not a checkpoint")
    earlier = sorted((p for p in Path(root).iterdir() if _NAME.match(p.name) and p.name < name),
                     reverse=True)  # fmt: skip
    for candidate in [path, *earlier]:
        problem = damage(candidate)
        if problem is None:
            return candidate
        log.warning(
            "checkpoint %s is damaged (%s): resuming from an earlier one", candidate, problem
        )
    log.warning("no intact checkpoint under %s: training starts over from step 0", root)
    return None


def file_sums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but SUMS, hashed on several threads (hashlib lets go
    of the GIL): a checkpoint is read once more at save time, at disk speed."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != SUMS)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(_sha256, files)
    return {p.relative_to(folder).as_posix(): d for p, d in zip(files, digests, strict=True)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def damage(path: Path) -> str | None:
    """What no longer matches the sums written with the checkpoint (None: intact, or written
    before checkpoints carried sums)."""
    for part, is_there in ((TAG, Path.is_dir), (STATE, Path.is_file)):
        if not is_there(Path(path) / part):
            return f"{part} is missing"
    try:
        recorded = json.loads((Path(path) / SUMS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"{SUMS} is unreadable"
    try:
        present = file_sums(path)
    except OSError as err:
        return f"a file cannot be read ({err})"
    for name, digest in recorded.items():
        if name not in present:
            return f"{name} is missing"
        if present[name] != digest:
            return f"{name} does not match its sha256"
    return None


def save_checkpoint(engine, root: Path, step: int, client_state: dict, keep: int) -> Path:
    """Collective: every rank calls it with the same step. Returns the checkpoint folder."""
    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else 0
    name = checkpoint_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(tmp), tag=TAG, client_state=client_state, save_latest=False)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / STATE).write_text(json.dumps(client_state, indent=2, sort_keys=True))
        (tmp / SUMS).write_text(json.dumps(file_sums(tmp), indent=1, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)  # a rerun past a step whose pointer was lost
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, name + "\n")
        _prune(root, keep, newest=name)
    _barrier()
    return final


def _prune(root: Path, keep: int, newest: str | None = None) -> None:
    """Drop all but the newest `keep` checkpoints, and temporary folders of dead saves.

    `newest`: the checkpoint just saved. Any with a later step is one a resume passed over
    (damaged) and must go first, or it would outrank, and prune, the checkpoints saved since.
    """
    for passed_over in (p for p in root.iterdir() if _NAME.match(p.name) and newest):
        if passed_over.name > newest:
            shutil.rmtree(passed_over, ignore_errors=True)
    done = sorted(p for p in root.iterdir() if _NAME.match(p.name))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def read_state(path: Path) -> dict:
    """The step, world size and config a checkpoint was written with."""
    return json.loads((Path(path) / STATE).read_text())


def load_checkpoint(engine, path: Path) -> dict:
    """Restore engine state and this rank's RNG from `path`; returns the client state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = Path(path) / f"rng-rank{rank}.pt"
    if not rng_file.exists():
        raise RuntimeError(
            f"{rng_file}: missing; the checkpoint was written by fewer ranks than this run has"
        )
    loaded, client_state = engine.load_checkpoint(
        str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
