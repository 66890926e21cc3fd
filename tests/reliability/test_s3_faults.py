"""A flaky object store: moto's S3 server behind a fault-injecting proxy on 127.0.0.1
(`fusellm.testing.s3faults`) that drops connections mid-download and mid-upload, answers
500/503/SlowDown, answers too late, or flips a byte. Transient faults are retried and the result
is byte-identical; persistent ones end in an error naming the object and the attempts made,
with nothing partial kept, renamed into place, or taken for a complete upload
(`benchmarks/fault_injection.py --s3 N` runs random faults at larger counts)."""

from __future__ import annotations

import os

import pytest
from s3server import s3_endpoint  # noqa: F401  (fixture)

from fusellm.io.s3 import MANIFEST, fetch_s3, list_s3, upload_dir
from fusellm.io.uris import SourceError, parse_uri
from fusellm.testing.s3faults import Fault, FaultyS3Proxy

pytestmark = pytest.mark.timeout(300)

MiB = 2**20
BUCKET = "flaky"
BIG = "big.bin"  # over the multipart threshold below: ranged GETs, a multipart upload


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    with FaultyS3Proxy(s3_endpoint) as p:
        yield p


@pytest.fixture
def flaky(proxy, monkeypatch):
    """Requests go through the proxy; 3 attempts, 2 s timeouts, 5 MiB parts (S3's least)."""
    monkeypatch.setenv("FUSELLM_S3_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("FUSELLM_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("FUSELLM_S3_TIMEOUT", "2")
    monkeypatch.setenv("FUSELLM_S3_MULTIPART_THRESHOLD", str(5 * MiB))
    monkeypatch.setenv("FUSELLM_S3_MULTIPART_CHUNK", str(5 * MiB))
    proxy.inject()
    return proxy


@pytest.fixture
def folder(tmp_path):
    """A folder to upload: a 6 MiB file and two small ones."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / BIG).write_bytes(os.urandom(6 * MiB))
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "vocab.txt").write_text("a\nb\n")
    return src


def _same(a, b) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    theirs = sorted(
        p.relative_to(b).as_posix()
        for p in b.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, ".fusellm-fetch.json")
    )
    return names == theirs and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def _published(folder, uri, proxy):
    proxy.inject()
    upload_dir(folder, uri)


TRANSIENT_GET = [
    ("drop-response", BIG, 2),  # cut off half-way through a ranged GET
    ("500", BIG, 2),
    ("503", BIG, 2),
    ("slowdown", BIG, 2),
    ("slow", BIG, 1),  # answers after the read timeout
    ("corrupt", BIG, 1),  # a flipped byte: caught by verification, downloaded again
    ("drop-response", MANIFEST, 2),
    ("500", "", 2),  # the listing and the HEADs too
]


@pytest.mark.parametrize("kind,key,times", TRANSIENT_GET)
def test_transient_download_faults_are_retried(flaky, folder, tmp_path, kind, key, times):
    uri = f"s3://{BUCKET}/get-{TRANSIENT_GET.index((kind, key, times))}"
    _published(folder, uri, flaky)
    flaky.inject(Fault(kind, "GET", key=key, times=times, delay=4.0))
    got = fetch_s3(parse_uri(uri), tmp_path / "mirror")
    assert _same(folder, got)
    assert flaky.count("GET", key, fault=kind) == times  # the faults were met...
    assert flaky.count("GET", key, fault=None) >= 1  # ...and retried past
    assert not list(got.rglob("*.partial"))


@pytest.mark.parametrize("kind", ["503", "slowdown", "drop-response", "slow", "corrupt"])
def test_persistent_download_faults_fail_naming_the_object(flaky, folder, tmp_path, kind):
    uri = f"s3://{BUCKET}/dead-{kind}"
    _published(folder, uri, flaky)
    flaky.inject(Fault(kind, "GET", key=BIG, times=None, delay=4.0))
    mirror = tmp_path / "mirror"
    tries = "downloaded twice" if kind == "corrupt" else "attempts"
    with pytest.raises(SourceError, match=rf"s3://{BUCKET}/dead-{kind}/{BIG}.*{tries}"):
        fetch_s3(parse_uri(uri), mirror)
    assert not (mirror / BIG).exists() and not list(mirror.rglob("*.partial"))
    assert flaky.count("GET", BIG) >= (2 if kind == "corrupt" else 3)  # every attempt made
    flaky.inject()  # the store recovers: the next fetch resumes and completes
    assert _same(folder, fetch_s3(parse_uri(uri), mirror))


@pytest.mark.parametrize("kind", ["drop-request", "500", "slowdown"])
def test_transient_upload_faults_are_retried(flaky, folder, tmp_path, kind):
    uri = f"s3://{BUCKET}/put-{kind}"
    flaky.inject(Fault(kind, "PUT", key=BIG, times=2))
    upload_dir(folder, uri)
    assert flaky.count("PUT", BIG, fault=kind) == 2
    flaky.inject()
    assert _same(folder, fetch_s3(parse_uri(uri), tmp_path / "mirror", require_manifest=True))


def test_a_failed_upload_is_never_taken_for_complete(flaky, folder, tmp_path):
    """An upload over an earlier complete one fails half-way: readers see an incomplete folder
    (no manifest), never the old files mixed with the new."""
    uri = f"s3://{BUCKET}/replaced"
    _published(folder, uri, flaky)
    (folder / "config.json").write_text('{"a": 2}')
    flaky.inject(Fault("drop-request", "PUT", key=BIG, times=None))
    with pytest.raises(SourceError, match=rf"s3://{BUCKET}/replaced/{BIG}.*incomplete"):
        upload_dir(folder, uri)
    flaky.inject()
    with pytest.raises(SourceError, match="upload is incomplete"):
        list_s3(parse_uri(uri), require_manifest=True)
    with pytest.raises(SourceError, match="upload is incomplete"):
        fetch_s3(parse_uri(uri), tmp_path / "mirror", require_manifest=True)
    upload_dir(folder, uri)  # once the store is back, the upload completes
    assert _same(folder, fetch_s3(parse_uri(uri), tmp_path / "mirror", require_manifest=True))
