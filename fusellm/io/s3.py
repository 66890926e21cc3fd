"""S3 (or MinIO) objects: listing identities, verified resumable downloads, manifest uploads.

Downloads are multipart, written to a temporary name, verified (size, ETag, the server's
checksums, the upload manifest's SHA-256: `verify_object`) and renamed, and resumable at object
granularity (`fetch_s3`). `upload_dir` writes files first and its manifest last, so readers never
take a half-uploaded folder for a complete one. boto3 reads credentials from the environment.

A flaky store is retried, then named: every request is retried with exponential backoff on
500/503/SlowDown, dropped connections and timeouts (botocore's standard mode; transfers also
retry a body cut off mid-way), up to FUSELLM_S3_MAX_ATTEMPTS attempts (default 5), each waiting
at most FUSELLM_S3_TIMEOUT seconds (default 60) for the server. A downloaded object that fails
verification is downloaded once more. What still fails raises a SourceError naming the object
and how many attempts were made; nothing partial is kept, renamed into place or listed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from fusellm.io.files import sha256_file, write_json_atomic
from fusellm.io.uris import S3URI, MissingObject, SourceError, mask_credentials, parse_uri

log = logging.getLogger(__name__)

MANIFEST = "fusellm-manifest.json"  # written last by upload_dir: readers trust what it lists
FETCH_STATE = ".fusellm-fetch.json"  # local record of fetched objects, for resuming
MiB = 2**20


def max_attempts() -> int:
    """Attempts per S3 request (the first one included): FUSELLM_S3_MAX_ATTEMPTS, default 5."""
    return max(1, int(os.environ.get("FUSELLM_S3_MAX_ATTEMPTS", "5")))


def timeout_s() -> float:
    """Seconds to wait for a connection or for the server's next bytes: FUSELLM_S3_TIMEOUT."""
    return float(os.environ.get("FUSELLM_S3_TIMEOUT", "60"))


# ---------------------------------------------------------------------------------------------
# S3


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint: the ref's own, else FUSELLM_S3_ENDPOINT_URL, else AWS_ENDPOINT_URL(_S3)."""
    return (
        endpoint_url
        or os.environ.get("FUSELLM_S3_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client; credentials come from boto3's usual chain (environment, profiles...).

    A fresh session each time: boto3's default one keeps the credentials it saw first, and the
    orchestration may set or rotate them in the environment between stages. The sessions share
    one loader of botocore's service descriptions, which is what makes a session slow to build.
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    session.register_component("data_loader", _botocore_loader())
    return boto3.session.Session(botocore_session=session).client(
        "s3",
        endpoint_url=s3_endpoint(endpoint_url),
        config=Config(
            retries={"max_attempts": max_attempts(), "mode": "standard"},
            connect_timeout=min(timeout_s(), 10.0),
            read_timeout=timeout_s(),
        ),
    )


@functools.cache
def _botocore_loader():
    import botocore.loaders

    return botocore.loaders.create_loader()


def transfer_config(threshold: int | None = None, chunk: int | None = None):
    """Multipart settings; FUSELLM_S3_MULTIPART_THRESHOLD/CHUNK (bytes) override the 64/16 MiB."""
    from boto3.s3.transfer import TransferConfig

    threshold = threshold or int(os.environ.get("FUSELLM_S3_MULTIPART_THRESHOLD", 64 * MiB))
    chunk = chunk or int(os.environ.get("FUSELLM_S3_MULTIPART_CHUNK", 16 * MiB))
    return TransferConfig(
        multipart_threshold=threshold,
        multipart_chunksize=chunk,
        max_concurrency=4,
        num_download_attempts=max_attempts(),  # a body cut off mid-way is fetched again
    )


@dataclass(frozen=True)
class S3Object:
    key: str
    name: str  # path relative to the URI's folder
    etag: str
    size: int
    sha256: str | None = None  # from the folder's upload manifest, when there is one


def _s3_error(err, what: str) -> SourceError:
    """A SourceError for a boto3 failure: the S3 error code and message, URLs redacted."""
    from botocore.exceptions import NoCredentialsError

    if isinstance(err, NoCredentialsError):
        return SourceError(
            f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the environment"
        )
    from boto3.exceptions import RetriesExceededError

    if isinstance(err, RetriesExceededError):  # a transfer's body kept being cut off
        last = err.last_exception
        detail = mask_credentials(f"{type(last).__name__}: {last}")
        return SourceError(f"{what}: S3 error {detail} (after {max_attempts()} attempts)")
    response = getattr(err, "response", None) or {}
    error = response.get("Error", {})
    detail = f"{error.get('Code', '')}: {error.get('Message', '')}" if error else str(err)
    detail = mask_credentials(detail)
    attempts = response.get("ResponseMetadata", {}).get("RetryAttempts")
    tries = f", after {attempts + 1} attempts" if attempts else ""
    if not error:  # a connection or timeout failure: botocore retried it max_attempts times
        tries = f", after {max_attempts()} attempts"
    return SourceError(f"{what}: S3 error {detail} ({type(err).__name__}{tries})")


def list_s3(
    uri: S3URI, *, endpoint_url: str | None = None, client=None, require_manifest: bool = False
) -> list[S3Object]:
    """Objects under an S3 key or prefix, sorted by key.

    ``s3://b/k`` names the single object ``k`` if it exists, else the folder ``k/``. When the
    folder holds a manifest written by `upload_dir`, only the files it lists count (files of an
    upload in progress are not seen) and each carries its SHA-256; `require_manifest` makes a
    folder without one an error (for artifacts this project wrote: no manifest = incomplete).
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    client = client or s3_client(endpoint_url)
    try:
        if uri.key and not uri.key.endswith("/"):
            try:
                head = client.head_object(Bucket=uri.bucket, Key=uri.key)
                name = uri.key.rsplit("/", 1)[-1]
                return [S3Object(uri.key, name, head["ETag"].strip('"'), head["ContentLength"])]
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") not in (
                    "404",
                    "NoSuchKey",
                    "NotFound",
                ):
                    raise
        prefix = uri.key.rstrip("/") + "/" if uri.key else ""
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=uri.bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue
                objects.append(
                    S3Object(
                        obj["Key"], obj["Key"][len(prefix) :], obj["ETag"].strip('"'), obj["Size"]
                    )
                )
        if not objects:
            raise MissingObject(f"{uri}: no object with this key and nothing under this prefix")
        sums = _manifest_sums(client, uri.bucket, objects)
    except (ClientError, BotoCoreError, Boto3Error) as err:
        raise _s3_error(err, f"listing {uri}") from None
    if sums is None:
        if require_manifest:
            raise SourceError(
                f"{uri}: no {MANIFEST}: the upload is incomplete or was not made by upload_dir"
            )
    else:
        missing = sorted(set(sums) - {o.name for o in objects})
        if missing:
            raise SourceError(f"{uri}: files listed in {MANIFEST} are missing: {missing[:5]}")
        objects = [
            S3Object(o.key, o.name, o.etag, o.size, sums.get(o.name))
            for o in objects
            if o.name in sums or o.name == MANIFEST
        ]
    return sorted(objects, key=lambda o: o.key)


def _manifest_sums(client, bucket: str, objects: list[S3Object]) -> dict[str, str] | None:
    """{name: sha256} from the folder's upload manifest, or None when the folder has none."""
    entry = next((o for o in objects if o.name == MANIFEST), None)
    if entry is None:
        return None
    body = read_object(client, bucket, entry.key)
    try:
        return {f["path"]: f["sha256"] for f in json.loads(body)["files"]}
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"s3://{bucket}/{entry.key}: malformed manifest") from None


def read_object(client, bucket: str, key: str) -> bytes:
    """A small object's bytes; a body cut off mid-way is read again (botocore retries the
    request, not the reading of its body)."""
    from botocore.exceptions import (
        FlexibleChecksumError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    cut_off = (
        ResponseStreamingError,
        IncompleteReadError,
        ReadTimeoutError,
        FlexibleChecksumError,
        ConnectionError,
    )
    for attempt in range(max_attempts()):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]  # retried by botocore
        try:
            return body.read()
        except cut_off as err:
            last = err
            time.sleep(min(0.2 * 2**attempt, 5.0))
    raise SourceError(
        f"reading s3://{bucket}/{key}: the body was cut off on each of {max_attempts()} "
        f"attempts ({type(last).__name__}: {mask_credentials(str(last))})"
    )


def listing_hash(objects: list[S3Object]) -> str:
    """Hash of the (key, ETag, size) listing: changes whenever any object is replaced."""
    h = hashlib.sha256()
    for o in sorted(objects, key=lambda o: o.key):
        h.update(f"{o.name}\0{o.etag}\0{o.size}\n".encode())
    return h.hexdigest()


def s3_cache_folder(cache_dir: str | Path, uri: S3URI) -> Path:
    """Where an S3 source is mirrored: one flat folder per (bucket, key) under `cache_dir`.

    Flat, named by a hash of the key, so that mirrors of a prefix and of a key inside it never
    nest into each other; the last part of the key is kept for people browsing the cache.
    """
    key = uri.key.rstrip("/")
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / "s3" / uri.bucket / f"{key.rsplit('/', 1)[-1] or '_bucket'}-{tag}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def multipart_etag(path: Path, part_size: int) -> str:
    """The ETag S3 gives a multipart upload: md5 of the parts' md5s, dash, number of parts."""
    digests = []
    with open(path, "rb") as f:
        while chunk := f.read(part_size):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


@dataclass(frozen=True)
class ServerChecks:
    """What the server says about an object's content, beyond the listing (one or two HEADs)."""

    etag_is_md5: bool = True  # False for SSE-KMS / SSE-C objects
    part_size: int | None = None  # of a multipart upload: needed to recompute its ETag
    crc32: str | None = None  # base64, full-object checksums only
    sha256: str | None = None


class ObjectChanged(SourceError):
    """The object was replaced since it was listed: downloading it again will not help."""


def server_checks(client, bucket: str, obj: S3Object) -> ServerChecks:
    """Ask the server for the checksums it keeps; refuse an object that changed since listing."""
    head = client.head_object(Bucket=bucket, Key=obj.key, ChecksumMode="ENABLED")
    if head["ETag"].strip('"') != obj.etag:
        raise ObjectChanged(
            f"s3://{bucket}/{obj.key} changed on the server during the fetch; run again"
        )
    encrypted = str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or bool(
        head.get("SSECustomerAlgorithm")
    )
    multipart = "-" in obj.etag
    part_size = None
    if multipart and not encrypted:
        part_size = client.head_object(Bucket=bucket, Key=obj.key, PartNumber=1)["ContentLength"]
    # Checksums of multipart uploads are usually "composite" (over the parts' checksums).
    full = not multipart or head.get("ChecksumType") == "FULL_OBJECT"
    return ServerChecks(
        etag_is_md5=not encrypted,
        part_size=part_size,
        crc32=head.get("ChecksumCRC32") if full else None,
        sha256=head.get("ChecksumSHA256") if full else None,
    )


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def verify_object(path: Path, obj: S3Object, checks: ServerChecks | None = None) -> None:
    """Check a downloaded object; raise SourceError naming the key on any mismatch.

    What we verify: the size, always. The ETag: for a single-part upload it is the MD5 of the
    content; for a multipart upload ("<md5 of the parts' md5s>-<parts>") we recompute it with the
    part size the server reports for part 1 (not for SSE-KMS/SSE-C objects, whose ETags are not
    MD5s). The server's full-object CRC32 / SHA-256 checksums when it keeps them (boto3 stores a
    CRC32 with every upload). And the SHA-256 that `upload_dir` recorded in its manifest: the one
    full-content check that holds whatever the server and the upload method were.
    """
    import zlib

    checks = checks or ServerChecks()
    size = path.stat().st_size
    if size != obj.size:
        raise SourceError(
            f"s3 object {obj.key}: downloaded {size} bytes, the server lists {obj.size}"
        )
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            md5.update(chunk)
            sha.update(chunk)
            crc = zlib.crc32(chunk, crc)
    if obj.sha256 is not None and sha.hexdigest() != obj.sha256:
        raise SourceError(
            f"s3 object {obj.key}: SHA-256 {sha.hexdigest()} does not match {obj.sha256} "
            f"recorded in {MANIFEST}"
        )
    if checks.sha256 is not None and _b64(sha.digest()) != checks.sha256:
        raise SourceError(f"s3 object {obj.key}: SHA-256 does not match the server's checksum")
    if checks.crc32 is not None and _b64(crc.to_bytes(4, "big")) != checks.crc32:
        raise SourceError(f"s3 object {obj.key}: CRC32 does not match the server's checksum")
    if not checks.etag_is_md5:
        return
    if re.fullmatch(r"[0-9a-f]{32}", obj.etag) and md5.hexdigest() != obj.etag:
        raise SourceError(
            f"s3 object {obj.key}: MD5 {md5.hexdigest()} does not match the ETag {obj.etag}"
        )
    if checks.part_size and multipart_etag(path, checks.part_size) != obj.etag:
        raise SourceError(
            f"s3 object {obj.key}: multipart checksum does not match the ETag {obj.etag}"
        )


def _local_path(folder: Path, name: str) -> Path:
    dest = (folder / name).resolve()
    if folder.resolve() not in dest.parents:
        raise SourceError(f"s3 key {name!r} would be written outside {folder}")
    return dest


def fetch_s3(
    uri: S3URI,
    folder: str | Path,
    *,
    endpoint_url: str | None = None,
    client=None,
    require_manifest: bool = False,
) -> Path:
    """Mirror an S3 key or prefix into `folder`; returns the folder (or the file for one key).

    Each object is downloaded (multipart, see `transfer_config`) to a temporary name in its final
    folder, verified (`verify_object`), then renamed. `FETCH_STATE` in the folder records the ETag
    and size of every finished object, so a re-run skips what is already there and unchanged:
    an interrupted fetch resumes at the first missing object (an object cut off mid-way is
    downloaded again from its start). Local files of objects that vanished from S3 are removed.
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    client = client or s3_client(endpoint_url)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(folder)
    objects = list_s3(uri, client=client, require_manifest=require_manifest)
    state_path = folder / FETCH_STATE
    state = _read_json(state_path)
    wanted = {o.name for o in objects}
    for name in sorted(set(state) - wanted):
        _local_path(folder, name).unlink(missing_ok=True)
        state.pop(name)
    config = transfer_config()
    bar = _bytes_bar(f"fetch {uri}", sum(o.size for o in objects))
    for obj in objects:
        dest = _local_path(folder, obj.name)
        if _already_fetched(dest, obj, state.get(obj.name), client, uri.bucket):
            bar.update(obj.size)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            _download(client, uri.bucket, obj, dest, config, bar)
        except (ClientError, BotoCoreError, Boto3Error) as err:
            raise _s3_error(err, f"downloading s3://{uri.bucket}/{obj.key}") from None
        state[obj.name] = {"etag": obj.etag, "size": obj.size, "mtime_ns": dest.stat().st_mtime_ns}
        write_json_atomic(state_path, state)
        log.info("fetched s3://%s/%s (%d bytes)", uri.bucket, obj.key, obj.size)
    bar.close()
    if len(objects) == 1 and objects[0].key == uri.key:
        return _local_path(folder, objects[0].name)
    return folder


def _download(client, bucket: str, obj: S3Object, dest: Path, config, bar) -> None:
    """Download to a temporary name, verify, rename; a copy that fails verification (damaged
    in transit) is downloaded once more before the failure is reported."""
    from botocore.exceptions import FlexibleChecksumError

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    where = f"s3://{bucket}/{obj.key}"
    try:
        for attempt in (1, 2):
            checks = server_checks(client, bucket, obj)  # ObjectChanged: no second try
            try:
                client.download_file(bucket, obj.key, str(tmp), Config=config, Callback=bar.update)
                verify_object(tmp, obj, checks)
                break
            except (SourceError, FlexibleChecksumError) as err:
                if attempt == 2:
                    raise SourceError(f"downloading {where}: {err} (downloaded twice)") from None
                log.warning("downloading %s: %s; downloading it again", where, err)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _bytes_bar(desc: str, total: int):
    """A byte progress bar, shown only for transfers big enough to watch (over 64 MiB)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=total < 64 * MiB)


def _remove_stale_partials(folder: Path) -> None:
    """Delete temporary files left by killed fetches (not those of a fetch still running)."""
    for partial in folder.rglob(".*.partial"):
        pid = partial.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        partial.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _already_fetched(dest: Path, obj: S3Object, known: dict | None, client, bucket: str) -> bool:
    """True when `dest` holds this very object; a local copy changed since download is an error.

    Unchanged objects (same ETag and size as recorded) are skipped. If the file's mtime moved
    since we wrote it, it is verified again: a copy that no longer matches its checksums was
    corrupted or edited in the cache, which we report instead of silently training on it.
    """
    if not known or known.get("etag") != obj.etag or known.get("size") != obj.size:
        return False
    if not dest.is_file():
        return False
    if dest.stat().st_mtime_ns != known.get("mtime_ns"):
        try:
            verify_object(dest, obj, server_checks(client, bucket, obj))
        except SourceError as err:
            raise SourceError(
                f"cached copy {dest} was modified after download ({err}); delete it to fetch it again"
            ) from None
    return True


def upload_dir(
    local_dir: str | Path, s3_uri: str, *, endpoint_url: str | None = None, client=None
) -> dict:
    """Upload a folder under an S3 prefix; readers see it complete or not at all.

    Any previous manifest is deleted first, every file is uploaded (multipart when large), and the
    manifest listing each file's size and SHA-256 is written last. `fetch_s3` and `list_s3` only
    trust files the manifest lists. Returns the manifest.
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise SourceError(f"upload_dir: {local_dir} is not a folder")
    uri = parse_uri(s3_uri)
    if not isinstance(uri, S3URI):
        raise SourceError(f"upload_dir: {s3_uri!r} is not an s3:// URI")
    client = client or s3_client(endpoint_url)
    prefix = uri.key.rstrip("/") + "/" if uri.key else ""
    files = sorted(
        p for p in local_dir.rglob("*") if p.is_file() and p.name not in (MANIFEST, FETCH_STATE)
    )
    config = transfer_config()
    entries = []
    bar = _bytes_bar(f"upload {s3_uri}", sum(p.stat().st_size for p in files))
    what = f"uploading {local_dir} to {s3_uri}"
    try:
        client.delete_object(Bucket=uri.bucket, Key=prefix + MANIFEST)
        for path in files:
            name = path.relative_to(local_dir).as_posix()
            what = f"uploading {path} to s3://{uri.bucket}/{prefix}{name}"
            sha = sha256_file(path)
            client.upload_file(
                str(path), uri.bucket, prefix + name, Config=config, Callback=bar.update
            )
            entries.append({"path": name, "size": path.stat().st_size, "sha256": sha})
        what = f"uploading the manifest of {s3_uri}"
        manifest = {"files": entries}
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        client.put_object(
            Bucket=uri.bucket,
            Key=prefix + MANIFEST,
            Body=body,
            ContentType="application/json",
            ContentMD5=base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode(),
        )
    except (ClientError, BotoCoreError, Boto3Error) as err:
        raise _s3_error(err, f"{what} (the folder stays incomplete: no {MANIFEST})") from None
    finally:
        bar.close()
    return manifest
