"""Helpers the test modules share: servers on 127.0.0.1 and tiny word corpora.

Servers: `free_port` picks a port; `start_server` starts a command in its own process group
with telemetry off and its output in a log file; `wait_http` / `wait_listening` block until it
answers and otherwise fail with the end of that log; `stop_server` signals exactly that process
group (its id is the server's PID) and kills what is left of it. `running_server` does all
three around a block::

    with running_server(argv, log, health_url=f"http://127.0.0.1:{port}/health") as proc:
        ...

Corpora: `tiny_texts` draws texts from `WORDS` (or a prefix of it), deterministic in its seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from fusellm.settings import LOCALHOST, TELEMETRY_OFF

STOP_GRACE_S = 15.0
LOG_TAIL_CHARS = 3000

# --- ports and servers ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def log_tail(log: Path | None, chars: int = LOG_TAIL_CHARS) -> str:
    """The end of a server's log, or a note saying there is none."""
    if log is None:
        return "(no log)"
    if not log.exists():
        return f"(no log at {log})"
    return log.read_text(errors="replace")[-chars:]


def start_server(
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    *,
    unset: Iterable[str] = (),
    cwd: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start `argv` in a new process group (session), output to `log`, stdin closed.

    Its environment is ours with telemetry off (`fusellm.settings.TELEMETRY_OFF`), then `env`,
    without the variables in `unset`. Returns at once: wait for it with `wait_http` or
    `wait_listening` (two servers started before waiting start side by side).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, **TELEMETRY_OFF, **(env or {})}
    for name in unset:
        environment.pop(name, None)
    with log.open("wb") as out:  # the server keeps its own handle
        return subprocess.Popen(
            list(argv),
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
        )


def api_json(url: str, body: dict | None = None):
    """GET `url` (POST `body` when given, as JSON) and return the decoded JSON answer: for REST
    calls where an async client cannot be used (Playwright's sync API owns the event loop)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body or {}).encode(),
        headers={"content-type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _wait(
    ready: Callable[[], bool],
    what: Callable[[], str],
    proc: subprocess.Popen,
    timeout: float,
    log: Path | None,
    name: str,
    poll_s: float,
) -> None:
    """Poll `ready` until it is true; fail when `proc` exits or `timeout` passes, with the log."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {proc.returncode} before {what()}; "
                f"its log ({log}) ends with:\n{log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{name} was not {what()} within {timeout:.0f} s; "
                f"its log ({log}) ends with:\n{log_tail(log)}"
            )
        time.sleep(poll_s)


def wait_http(
    urls: str | Sequence[str],
    proc: subprocess.Popen,
    timeout: float,
    log: Path | None = None,
    *,
    name: str = "server",
    poll_s: float = 0.5,
) -> None:
    """Block until each URL in turn answers 200 (one deadline for all of them)."""
    pending = [urls] if isinstance(urls, str) else list(urls)

    def ready() -> bool:
        while pending:
            try:
                with urllib.request.urlopen(pending[0], timeout=5) as response:
                    if response.status != 200:
                        return False
            except OSError:
                return False
            pending.pop(0)
        return True

    _wait(ready, lambda: f"answering {pending[0]}", proc, timeout, log, name, poll_s)


def wait_listening(
    port: int,
    proc: subprocess.Popen,
    timeout: float,
    log: Path | None = None,
    *,
    name: str = "server",
    poll_s: float = 0.1,
) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:`port`."""

    def ready() -> bool:
        try:
            with socket.create_connection((LOCALHOST, port), timeout=0.5):
                return True
        except OSError:
            return False

    _wait(ready, lambda: f"listening on {LOCALHOST}:{port}", proc, timeout, log, name, poll_s)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_server(
    proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = STOP_GRACE_S
) -> None:
    """`sig` to the server's process group, SIGKILL after `grace_s`; then SIGKILL whatever is
    left in the group, so that no worker outlives the test, and reap the server.

    The group is the one `start_server` made, whose id is the server's PID. SIGTERM by default
    rather than SIGINT: a test run started in the background (CI, `nohup`) hands its children
    SIGINT ignored.
    """
    if proc.poll() is None:
        _signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def running_server(
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    *,
    health_url: str | Sequence[str] | None = None,
    port: int | None = None,
    timeout: float = 120.0,
    name: str | None = None,
    stop_signal: int = signal.SIGTERM,
    grace_s: float = STOP_GRACE_S,
    **start_options,
) -> Iterator[subprocess.Popen]:
    """`start_server`, wait until `health_url` answers (or `port` listens), yield the process,
    and `stop_server` it however the block ends."""
    name = name or Path(argv[0]).name
    proc = start_server(argv, log, env, **start_options)
    try:
        if health_url is not None:
            wait_http(health_url, proc, timeout, log, name=name)
        elif port is not None:
            wait_listening(port, proc, timeout, log, name=name)
        yield proc
    finally:
        stop_server(proc, stop_signal, grace_s)


# --- tiny corpora -----------------------------------------------------------------------------

# English words first, then code words: a prefix of the list is a smaller English vocabulary.
WORDS = (
    "the", "cat", "sat", "on", "a", "mat", "while", "dogs", "run", "fast", "and", "birds", "sing",
    "over", "green", "hills", "near", "water",
    "def", "return", "import", "class", "for", "in", "if", "else", "print", "value", "list",
)  # fmt: skip


def tiny_texts(
    n: int, seed: int, lengths: tuple[int, int], words: Sequence[str] = WORDS
) -> list[str]:
    """`n` texts of random `words`, each of between `lengths[0]` and `lengths[1]` words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*lengths))) for _ in range(n)]


def tiny_training_inputs(root: Path) -> Path:
    """`root/model` (a tiny two-layer Llama on English words) and `root/data` (a synthetic fused
    store for it with two sources): what the training tests train on. Returns `root`."""
    from fusellm.testing.synthetic import synthetic_store
    from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

    texts = tiny_texts(48, seed=0, lengths=(5, 25), words=WORDS[:18])  # English words only
    tok = train_tokenizer(texts, "spm", vocab_size=360)
    save_tiny(
        tiny_model("llama", tok, seed=1, hidden=32, layers=2, heads=4, max_positions=128),
        tok,
        root / "model",
    )
    synthetic_store(root / "data", tok, texts, top_k=4, sources=["llama-src", "mpt-src"])
    return root


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def training_env(**extra: str) -> dict[str, str]:
    """This environment for a training process: no launcher variables inherited (an in-process
    training leaves them behind), the repository's shared extension cache, one thread; then
    `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["TORCH_EXTENSIONS_DIR"] = str(
        Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"
    )
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def folder_bytes(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` by its relative path: two folders built alike compare equal."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
