"""How a command that runs a flow reports a failure: one red line, the details in a log file.

While the flow runs, everything Prefect logs also goes to ``<home>/logs/<command>-<time>.log``
(tracebacks included); the console shows Prefect's lines without tracebacks. When the flow
fails, the traceback is appended to that file, and the command ends with one line: the stage
(and task) where it happened, the error's own message (which names the file or the field), and
what to do next.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from fusellm.settings import logs_dir

FILE_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"


class _WithoutTraceback(logging.Formatter):
    """Formats like `inner`, leaving out the exception and stack (the log file keeps them)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def new_log_file(home: Path, command: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return logs_dir(home) / f"{command}-{stamp}.log"


@contextmanager
def logged_to(path: Path) -> Iterator[Path]:
    """Send every log record reaching the root logger to `path`; keep tracebacks off the console.

    Call after Prefect is imported (it installs its console handler on the root logger then).
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    consoles = [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    saved = [h.formatter for h in consoles]
    for h in consoles:
        h.setFormatter(_WithoutTraceback(h.formatter))
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        for h, formatter in zip(consoles, saved):
            h.setFormatter(formatter)


def where(error: BaseException) -> str:
    from fusellm_tasks.stages import failed_where

    return failed_where(error) or "the flow itself (outside its stages)"


def one_line(error: BaseException) -> str:
    """The error's own message on one line (a config error lists its fields with '; ')."""
    text = str(error).strip() or repr(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(error).__name__}: {'; '.join(lines)}"


def record(error: BaseException, log: Path) -> None:
    """Append the full traceback to the log file."""
    with log.open("a", encoding="utf-8") as out:
        out.write("\n--- the error that ended the run ---\n")
        out.write("".join(traceback.format_exception(error)))


def failure_line(flow: str, error: BaseException, log: Path) -> str:
    return (
        f"error: the {flow} flow failed in {where(error)}: {one_line(error)} — fix that and run "
        f"the same command again (finished stages are reused); full log: {log}"
    )
