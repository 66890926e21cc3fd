"""A real S3 endpoint for tests: moto's standalone server on 127.0.0.1, over HTTP.

Import the fixture into a test module (``from s3server import s3_endpoint``). The server starts
once per module on a free port, holds nothing across restarts, and is stopped at the end. Tests
get dummy credentials in the environment and a fresh bucket from `s3_bucket`.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
from support import free_port, running_server

from fusellm.settings import LOCALHOST

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """URL of a moto S3 server on 127.0.0.1, with dummy credentials in the environment."""
    if not MOTO_SERVER.exists():
        pytest.skip(
            f"moto_server not installed next to {sys.executable} (pip install 'moto[server]')"
        )
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    argv = [str(MOTO_SERVER), "-H", LOCALHOST, "-p", str(port)]
    # SIGTERM (the default) stops it at once: it holds nothing worth a clean shutdown.
    with (
        running_server(argv, log, DUMMY_ENV, port=port, timeout=60, grace_s=10),
        pytest.MonkeyPatch.context() as mp,
    ):
        for key, value in DUMMY_ENV.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        url = f"http://{LOCALHOST}:{port}"
        mp.setenv("FUSELLM_S3_ENDPOINT_URL", url)
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket name on the test server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
