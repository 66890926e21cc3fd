"""A real S3 endpoint for tests: moto's standalone server on 127.0.0.1, over HTTP.

Import the fixture into a test module (``from s3server import s3_endpoint``). The server starts
once per module on a free port, holds nothing across restarts, and is stopped at the end. Tests
get dummy credentials in the environment and a fresh bucket from `s3_bucket`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

from pathlib import Path

import pytest

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{port} within {timeout}s")


@pytest.fixture(scope="module")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1, with dummy credentials in the environment."""
    if not MOTO_SERVER.exists():
        pytest.skip(
            f"moto_server not installed next to {sys.executable} (pip install 'moto[server]')"
        )
    port = _free_port()
    proc = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **DUMMY_ENV},
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in DUMMY_ENV.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        url = f"http://127.0.0.1:{port}"
        mp.setenv("FUSELLM_S3_ENDPOINT_URL", url)
        try:
            _wait_listening(port, proc)
            yield url
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket name on the test server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
