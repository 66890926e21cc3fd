"""Small file helpers shared by every stage: atomic writes, content hashes, file locks.

Every artifact is written under a temporary name in its own folder and renamed into place, so a
reader (or a resumed run) never sees half a file, whenever the writer is killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CorruptFileError(RuntimeError):
    """A stored file is missing, truncated or changed since it was written (`path`).

    Raised by the readers that verify what they read (top-k stores, pieces); the stage runner
    moves the stage folder holding `path` aside, so that the next run recomputes it.
    """

    def __init__(self, path: str | os.PathLike, message: str):
        super().__init__(message)
        self.path = Path(path)

    def __reduce__(self):  # raised in a worker process, it must reach the parent intact
        return (type(self), (self.path, str(self)), self.__dict__)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: setting it back and forth while other threads create files would give
# theirs the wrong permissions.
UMASK = _read_umask()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` beside `path` and rename it into place (folders created).

    The file gets the permissions `open` would give it (0666 less the umask), not mkstemp's
    0600: a work folder is shared by the users and containers that run the stages.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text written atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """JSON (sorted keys, indented) written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `path` between processes and threads (flock on a fresh descriptor),
    released by the kernel if the holder dies, so a killed run never blocks the next one."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
