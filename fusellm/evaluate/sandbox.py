"""Run untrusted generated programs in a contained subprocess.

Model-written code is executed to score it (MultiPL-E pass@1), so each program gets:

- its own temporary directory (working directory, HOME and TMPDIR), removed afterwards;
- rlimits on CPU time, data memory, file size, open files and processes;
- a wall-clock limit, after which its whole process group (and session) is killed;
- no network: a fresh network namespace where the kernel lets us create one, and a Landlock
  rule set that forbids TCP connect/bind;
- no writes outside its directory: Landlock allows file creation and writing only beneath it;
- when we run as root, the program itself runs as `nobody`, since root ignores the process-count
  limit (a fork bomb would otherwise only be stopped by the wall clock).

Landlock and namespaces are probed once; `isolation()` says what this machine gives, so results
can state it. `RLIMIT_DATA` is the memory limit, not `RLIMIT_AS`: the JVM and V8 reserve large
inaccessible address ranges at start-up that never become memory, and would not start under a
tight address-space limit.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38

# Landlock (linux/landlock.h); x86_64 / aarch64 share these syscall numbers.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE = 1 << 1
_FS_REMOVE_DIR, _FS_REMOVE_FILE = 1 << 4, 1 << 5
_FS_MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@dataclass(frozen=True)
class Limits:
    """Resource limits for one program (one compile or run step)."""

    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_bytes: int = 1 << 30
    max_processes: int = 64
    max_file_bytes: int = 16 << 20
    max_open_files: int = 256


@dataclass
class SandboxResult:
    """What one program did: exit status, why it ended, and the tail of its output."""

    returncode: int | None
    reason: str
    stdout: str
    stderr: str
    wall_seconds: float
    pid: int | None = None  # also the program's session id: nothing may remain in it afterwards
    isolation: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.reason == "exit 0"


@lru_cache(maxsize=1)
def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable."""
    abi = _libc.syscall(_SYS_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    return max(int(abi), 0)


@lru_cache(maxsize=1)
def _unshare_flags() -> int:
    """Namespace flags a child may use to leave the network (0 if the kernel refuses)."""
    candidates = [_CLONE_NEWNET] if os.geteuid() == 0 else []
    candidates.append(_CLONE_NEWUSER | _CLONE_NEWNET)
    for flags in candidates:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os._exit(0 if _libc.unshare(flags) == 0 else 1)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:
            return flags
    return 0


def sandbox_user() -> pwd.struct_passwd | None:
    """The user programs run as when we are root (root would ignore the process limit)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


def isolation() -> dict:
    """What containment this machine provides, recorded next to the scores."""
    user = sandbox_user()
    return {
        "landlock_abi": landlock_abi(),
        "network_namespace": bool(_unshare_flags()),
        "run_as": user.pw_name if user else pwd.getpwuid(os.geteuid()).pw_name,
    }


def _processes_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


def _landlock_restrict(workdir: str, abi: int) -> None:
    """Allow writes only beneath `workdir` (and to /dev/null); forbid TCP (ABI >= 4)."""
    write_fs = _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE
    if abi >= 2:
        write_fs |= _FS_REFER
    if abi >= 3:
        write_fs |= _FS_TRUNCATE
    attr = _RulesetAttr(
        handled_access_fs=write_fs,
        handled_access_net=(_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0,
        scoped=(_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0,
    )
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = _libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    for path, access in ((workdir, write_fs), ("/dev/null", _FS_WRITE_FILE)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
        if _libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0):
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path} failed")
        os.close(fd)
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    if _libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0):
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)


def _child_setup(workdir: str, limits: Limits, nproc: int, user, drop_user: bool):
    """Runs in the forked child before exec: leave the network, set limits, lock down, drop root."""
    flags, abi = _unshare_flags(), landlock_abi()

    def setup() -> None:  # pragma: no cover - runs in the child process
        if flags:
            _libc.unshare(flags)
        for res, value in (
            (resource.RLIMIT_DATA, limits.memory_bytes),
            (resource.RLIMIT_FSIZE, limits.max_file_bytes),
            (resource.RLIMIT_NOFILE, limits.max_open_files),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, nproc),
        ):
            resource.setrlimit(res, (value, value))
        # Soft below hard: the program first gets SIGXCPU, which names the cause.
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        if abi:
            _landlock_restrict(workdir, abi)
        if user is not None and drop_user:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    return setup


def _session_processes(sid: int) -> list[tuple[int, bytes, int]]:
    """(pid, state, parent pid) of every process whose session is `sid`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            found.append((int(entry.name), fields[0], int(fields[1])))
    return found


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes whose session is `sid`."""
    return [pid for pid, state, _ in _session_processes(sid) if state not in (b"Z", b"X")]


def _kill_session(proc: subprocess.Popen) -> None:
    """Kill the program's process group, reap it, then kill and reap anything left in its session.

    We are a child subreaper meanwhile, so orphaned descendants come back to us and are reaped
    here rather than left as zombies for an init that may never collect them.
    """
    sid = proc.pid
    try:
        os.killpg(sid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for _ in range(200):
        found = _session_processes(sid)
        if not found:
            return
        for pid, state, ppid in found:
            try:
                if state in (b"Z", b"X"):
                    if ppid == os.getpid():
                        os.waitpid(pid, os.WNOHANG)
                else:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if all(state in (b"Z", b"X") and ppid != os.getpid() for _, state, ppid in found):
            return  # zombies of another reaper: dead, holding nothing but a table entry
        time.sleep(0.01)


_PR_SET_CHILD_SUBREAPER = 36
_reaper_lock = threading.Lock()
_reaper_users = 0


@contextmanager
def _subreaper():
    """Adopt orphaned descendants while a program runs (process-wide flag, reference counted)."""
    global _reaper_users
    with _reaper_lock:
        if _reaper_users == 0:
            _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _reaper_users += 1
    try:
        yield
    finally:
        with _reaper_lock:
            _reaper_users -= 1
            if _reaper_users == 0:
                _libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _tail(path: Path, limit: int = 8192) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(handle.tell() - limit, 0))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _reason(returncode: int, timed_out: bool) -> str:
    if timed_out:
        return "wall-time limit"
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return "CPU-time limit"
        if sig == signal.SIGXFSZ:
            return "file-size limit"
        return f"killed by signal {signal.Signals(sig).name}"
    return f"exit {returncode}"


def run_in(
    workdir: Path,
    argv: list[str],
    limits: Limits = Limits(),
    *,
    env: dict[str, str] | None = None,
    drop_user: bool = True,
) -> SandboxResult:
    """Run `argv` in `workdir` under `limits`; the caller owns (and removes) `workdir`.

    `drop_user=False` keeps the caller's user (for compilers that live in root's home); the
    program stays confined by Landlock, the namespace and the rlimits.
    """
    user = sandbox_user()
    uid = user.pw_uid if (user is not None and drop_user) else os.geteuid()
    nproc = _processes_of(uid) + limits.max_processes
    child_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        **(env or {}),
    }
    out_path, err_path = workdir / ".stdout", workdir / ".stderr"
    start = time.monotonic()
    with _subreaper(), open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            # Limits, Landlock and the namespace must be set between fork and exec; the setup
            # imports nothing and takes no locks, which keeps preexec_fn safe enough here.
            preexec_fn=_child_setup(str(workdir), limits, nproc, user, drop_user),  # noqa: PLW1509
        )
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_session(proc)
    wall = time.monotonic() - start
    return SandboxResult(
        returncode=proc.returncode,
        reason=_reason(proc.returncode, timed_out),
        stdout=_tail(out_path),
        stderr=_tail(err_path),
        wall_seconds=wall,
        pid=proc.pid,
        isolation=isolation(),
    )


def sandbox_dir(root: str | Path | None = None, prefix: str = "fusellm-sandbox-") -> Path:
    """A fresh private directory the (possibly unprivileged) program may write in."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    user = sandbox_user()
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def run_program(
    files: dict[str, str],
    steps: list[tuple[list[str], Limits, bool]],
    *,
    env: dict[str, str] | None = None,
    root: str | Path | None = None,
) -> SandboxResult:
    """Write `files` into a fresh directory (under `root`, default the system temporary folder)
    and run each (argv, limits, drop_user) step there.

    Stops at the first failing step (a compile error is a failure like a wrong answer), then
    kills whatever is left and removes the directory, so nothing outlives the call.
    """
    workdir = sandbox_dir(root)
    try:
        for name, text in files.items():
            target = workdir / name
            target.write_text(text, encoding="utf-8")
            user = sandbox_user()
            if user is not None:
                os.chown(target, user.pw_uid, user.pw_gid)
        result = SandboxResult(None, "no steps", "", "", 0.0)
        for argv, limits, drop_user in steps:
            result = run_in(workdir, argv, limits, env=env, drop_user=drop_user)
            if not result.ok:
                break
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
