"""The sandbox contains hostile programs: each ends within its limits, fails, leaves nothing."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fusellm.evaluate.sandbox import (
    Limits,
    isolation,
    landlock_abi,
    run_program,
    session_members,
)

LIMITS = Limits(cpu_seconds=2, wall_seconds=3.0, memory_bytes=256 << 20, max_processes=16)
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


@pytest.fixture
def root():
    """A searchable parent for sandbox folders (the unprivileged user must reach them)."""
    path = Path(tempfile.mkdtemp(prefix="fusellm-sandbox-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(source: str, root: Path, limits: Limits = LIMITS, drop_user: bool = True):
    start = time.monotonic()
    result = run_program({"main.py": source}, [([PYTHON, "main.py"], limits, drop_user)], root=root)
    return result, time.monotonic() - start


def _assert_contained(result, elapsed: float, root: Path, limits: Limits = LIMITS) -> None:
    assert not result.ok
    assert elapsed < limits.wall_seconds + 2.0, f"took {elapsed:.1f}s"
    assert session_members(result.pid) == [], "a process of the program is still alive"
    assert list(root.iterdir()) == [], "the sandbox folder was not removed"


def test_correct_program_passes_and_leaves_nothing(root):
    result, _ = _run("print(6 * 7)", root)
    assert result.ok, result.stderr
    assert result.stdout.strip() == "42"
    assert list(root.iterdir()) == []


def test_failing_program_is_a_failure(root):
    result, _ = _run("raise SystemExit(3)", root)
    assert result.returncode == 3 and not result.ok


def test_infinite_loop_is_stopped_by_cpu_limit(root):
    result, elapsed = _run("while True:\n    pass\n", root)
    _assert_contained(result, elapsed, root)
    assert result.reason in ("CPU-time limit", "wall-time limit")


def test_sleeping_program_is_stopped_by_wall_limit(root):
    result, elapsed = _run("import time\ntime.sleep(60)\n", root)
    _assert_contained(result, elapsed, root)
    assert result.reason == "wall-time limit"


def test_fork_bomb_is_bounded_and_killed(root):
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    result, elapsed = _run(bomb, root)
    _assert_contained(result, elapsed, root)


def test_memory_hog_fails(root):
    result, elapsed = _run("block = bytearray(2 << 30)\nprint(len(block))\n", root)
    _assert_contained(result, elapsed, root)
    assert "MemoryError" in result.stderr


@pytest.mark.parametrize("drop_user", [True, False], ids=["sandbox-user", "caller-user"])
def test_write_outside_its_folder_is_refused(root, drop_user):
    if landlock_abi() == 0:
        pytest.skip(
            "the kernel has no Landlock (Linux >= 5.13 with it enabled): writes are then "
            "limited by file permissions alone"
        )
    outside = Path(tempfile.mkdtemp(prefix="fusellm-outside-"))
    outside.chmod(0o777)  # writable by anyone: only the sandbox can stop the write
    target = outside / "escaped.txt"
    try:
        result, elapsed = _run(
            f"open({str(target)!r}, 'w').write('x')\n", root, drop_user=drop_user
        )
        _assert_contained(result, elapsed, root)
        assert not target.exists()
        assert "Permission denied" in result.stderr or "Read-only" in result.stderr
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_network_connection_is_refused(root):
    info = isolation()
    if not info["network_namespace"] and info["landlock_abi"] < 4:
        pytest.skip("neither network namespaces nor Landlock TCP rules are available here")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        source = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'leak')\nprint('connected')\n"
        )
        result, elapsed = _run(source, root)
        _assert_contained(result, elapsed, root)
        assert "connected" not in result.stdout
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_isolation_is_reported():
    info = isolation()
    assert set(info) == {"landlock_abi", "network_namespace", "run_as"}
    if os.geteuid() == 0:
        assert info["run_as"] != "root"
