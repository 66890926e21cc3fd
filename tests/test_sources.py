"""Model sources: URI parsing, content identity, Hub cache (offline), S3 over HTTP, safe loading."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from s3server import DUMMY_ENV, s3_bucket, s3_endpoint  # noqa: F401  (fixtures)

from fusellm.io import s3 as s3_module
from fusellm.io.s3 import (
    FETCH_STATE,
    MANIFEST,
    S3Object,
    ServerChecks,
    fetch_s3,
    list_s3,
    upload_dir,
    verify_object,
)
from fusellm.io.sources import (
    ModelRef,
    fetch,
    load_model,
    load_tokenizer,
    local_identity,
    resolve,
)
from fusellm.io.uris import S3URI, HubURI, LocalURI, SourceError, mask_credentials, parse_uri
from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

SHA = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["the quick brown fox jumps over the lazy dog"] * 20 + ["def f(x):\n    return x + 1"] * 20


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    tok = train_tokenizer(TEXTS, kind="bytelevel", vocab_size=300)
    model = tiny_model("gpt2", tok, hidden=32, layers=1, heads=2, max_positions=64)
    return save_tiny(model, tok, tmp_path_factory.mktemp("tiny") / "model")


# --------------------------------------------------------------------------------------------
# URIs and refs


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("hf://meta-llama/Llama-2-7b-hf@abc123", HubURI("meta-llama/Llama-2-7b-hf", "abc123")),
        ("hf://gpt2", HubURI("gpt2", "main")),
        ("hf://org/name@refs/pr/1", HubURI("org/name", "refs/pr/1")),
        ("hf://datasets/org/pile", HubURI("org/pile", "main", "dataset")),
        ("s3://my-bucket/models/llama/", S3URI("my-bucket", "models/llama/")),
        ("s3://my-bucket", S3URI("my-bucket", "")),
        ("file:///data/model", LocalURI(Path("/data/model"))),
        ("relative/model", LocalURI(Path("relative/model"))),
    ],
)
def test_parse_uri(uri, expected):
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(
    "uri, message",
    [
        ("hf://org/name@", "empty revision"),
        ("hf://a/b/c", "org/name"),
        ("hf://bad name!", "invalid Hub repository id"),
        ("s3://UPPER/x", "invalid S3 bucket name"),
        ("s3://key:secret@bucket/x", "credentials or ports do not belong"),
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("file://host/x", "file:// URIs must name a local path"),
        ("  ", "empty source URI"),
    ],
)
def test_parse_uri_errors(uri, message):
    with pytest.raises(SourceError, match=message):
        parse_uri(uri)


def test_s3_credentials_in_uri_are_not_echoed():
    with pytest.raises(SourceError) as err:
        parse_uri("s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/x")
    assert "wJalrXUtnFEMI" not in str(err.value)


@pytest.mark.parametrize(
    "text, masked",
    [
        ("http://user:pw@127.0.0.1:9000/x", "http://user:***@127.0.0.1:9000/x"),
        ("https://ghp_token@github.com/o/r", "https://***@github.com/o/r"),
        ("http://u:p@ss@host/x", "http://u:***@host/x"),  # an "@" inside the password
        ("at s3://k:s@b/x, http://u:p@h", "at s3://k:***@b/x, http://u:***@h"),  # messages
        ("hf://gpt2@main", "hf://gpt2@main"),  # "@" starts a revision there
        ("mail user@example.com", "mail user@example.com"),
        (None, None),
    ],
)
def test_mask_credentials(text, masked):
    assert mask_credentials(text) == masked


def test_model_ref_errors_name_the_field():
    with pytest.raises(ValidationError) as err:
        ModelRef(uri="gs://b/x")
    assert err.value.errors()[0]["loc"] == ("uri",)
    with pytest.raises(ValidationError) as err:
        ModelRef(uri="hf://org/name", dtype="int8")
    assert err.value.errors()[0]["loc"] == ("dtype",)
    with pytest.raises(ValidationError, match="names a Hub dataset"):
        ModelRef(uri="hf://datasets/org/name")
    with pytest.raises(ValidationError, match="trust_remote_codes"):
        ModelRef(uri="hf://org/name", trust_remote_codes=True)


def test_model_ref_defaults_and_display_name():
    ref = ModelRef(uri="hf://org/Llama-7b@v1")
    assert (ref.trust_remote_code, ref.dtype) == (False, "auto")
    assert ref.display_name == "Llama-7b"
    assert ModelRef(uri="s3://bkt/models/mpt/").display_name == "mpt"
    assert ModelRef(uri="/x/y", name="src").display_name == "src"


def test_credentials_never_enter_a_config_object():
    with pytest.raises(ValidationError) as err:
        ModelRef(uri="s3://bkt/m", endpoint_url="http://minio:topsecret@10.0.0.1:9000")
    assert err.value.errors()[0]["loc"] == ("endpoint_url",)
    assert "carries credentials" in str(err.value) and "topsecret" not in str(err.value)
    with pytest.raises(ValidationError) as err:
        ModelRef(uri="s3://AKIDEXAMPLE:topsecret@bkt/m")
    assert "topsecret" not in str(err.value)  # pydantic would echo the input without hiding
    with pytest.raises(ValidationError, match="must start with http"):
        ModelRef(uri="s3://bkt/m", endpoint_url="minio:9000")
    ref = ModelRef(uri="s3://bkt/m", endpoint_url="http://10.0.0.1:9000")
    assert (
        "10.0.0.1:9000" in repr(ref) and ref.model_dump()["endpoint_url"] == "http://10.0.0.1:9000"
    )


# --------------------------------------------------------------------------------------------
# Local sources


def test_local_identity_hashes_small_files_and_stats_big_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "weights.safetensors").write_bytes(b"x" * 100)

    def ident():
        return local_identity(tmp_path, small=50)

    first = ident()
    assert first == ident()

    # A same-size edit of a small file with its mtime restored is still seen (content hash).
    st = os.stat(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"a": 2}')
    os.utime(tmp_path / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns))
    second = ident()
    assert second != first

    # A big file is identified by size and mtime: a same-size edit with the mtime restored is
    # (by design) not seen, a new mtime is.
    big = tmp_path / "weights.safetensors"
    st = os.stat(big)
    big.write_bytes(b"y" * 100)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ident() == second
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ident() != second


def test_local_resolve_and_fetch(tiny_folder):
    ref = ModelRef(uri=f"file://{tiny_folder}")
    resolved = resolve(ref)
    assert resolved.kind == "local" and resolved.identity.startswith("local:")
    assert fetch(ref, "/nonexistent-cache") == tiny_folder
    with pytest.raises(SourceError, match="does not exist"):
        resolve(ModelRef(uri=str(tiny_folder / "missing")))


def test_load_model_and_tokenizer_with_dtype(tiny_folder):
    ref = ModelRef(uri=str(tiny_folder), dtype="bfloat16")
    model = load_model(tiny_folder, ref)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training
    tok = load_tokenizer(tiny_folder, ref)
    assert tok("the quick brown fox")["input_ids"]


def test_load_model_refuses_pickled_weights(tmp_path, tiny_folder):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_folder / "config.json").read_text())
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(SourceError, match="no \\*.safetensors weights"):
        load_model(folder, ModelRef(uri=str(folder)))


def test_remote_code_does_not_run_unless_opted_in(tmp_path, tiny_folder):
    folder = tmp_path / "custom"
    folder.mkdir()
    for f in tiny_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil-model"  # unknown to transformers: only remote code could load it
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="trust_remote_code"):
        load_model(folder, ModelRef(uri=str(folder)))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Hugging Face Hub, offline


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_offline_empty_cache_is_a_clear_error(tmp_path, offline):
    ref = ModelRef(uri="hf://acme/tiny-llama@main")
    for call in (
        lambda: resolve(ref, hub_cache=tmp_path),
        lambda: fetch(ref, tmp_path, hub_cache=tmp_path),
    ):
        with pytest.raises(SourceError) as err:
            call()
        assert "acme/tiny-llama" in str(err.value)
        assert "not in the Hugging Face cache" in str(err.value)


def _prefill_hub_cache(cache: Path, repo: str, model_folder: Path, sha: str = SHA) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in model_folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)
    return snap


def test_hub_prefilled_cache_loads_offline(tmp_path, tiny_folder, offline):
    snap = _prefill_hub_cache(tmp_path, "acme/tiny", tiny_folder)
    ref = ModelRef(uri="hf://acme/tiny")
    resolved = resolve(ref, hub_cache=tmp_path)
    assert resolved.identity == f"hub:{SHA}" and resolved.kind == "hub"
    folder = fetch(ref, tmp_path / "unused", hub_cache=tmp_path)
    assert folder.resolve() == snap.resolve()
    model = load_model(folder, ref)
    assert model.config.vocab_size == len(load_tokenizer(folder, ref))
    # A revision given as a commit sha resolves to itself; an unknown branch is not cached.
    assert (
        resolve(ModelRef(uri=f"hf://acme/tiny@{SHA}"), hub_cache=tmp_path).identity == f"hub:{SHA}"
    )
    with pytest.raises(SourceError, match="revision v2"):
        resolve(ModelRef(uri="hf://acme/tiny@v2"), hub_cache=tmp_path)


# --------------------------------------------------------------------------------------------
# S3 over HTTP (moto server)


@pytest.fixture
def small_multipart(monkeypatch):
    """Multipart from 5 MiB (S3's smallest part), so a test file of 11 MiB has 3 parts."""
    monkeypatch.setenv("FUSELLM_S3_MULTIPART_THRESHOLD", str(5 * 2**20))
    monkeypatch.setenv("FUSELLM_S3_MULTIPART_CHUNK", str(5 * 2**20))


def _model_dir(root: Path, big: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"model_type": "gpt2"}')
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    sub = root / "sub"
    sub.mkdir(exist_ok=True)
    (sub / "notes.txt").write_text("hello")
    if big:
        (root / "model.safetensors").write_bytes(os.urandom(big))
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, FETCH_STATE)
    }


def _same_tree(a: Path, b: Path) -> bool:
    return _files(a) == _files(b)


def test_upload_fetch_multipart_roundtrip(tmp_path, s3_bucket, small_multipart):
    src = _model_dir(tmp_path / "src", big=11 * 2**20)
    manifest = upload_dir(src, f"s3://{s3_bucket}/models/tiny")
    assert {f["path"] for f in manifest["files"]} == {
        "config.json",
        "tokenizer.json",
        "sub/notes.txt",
        "model.safetensors",
    }

    objects = {o.name: o for o in list_s3(S3URI(s3_bucket, "models/tiny"))}
    assert objects["model.safetensors"].etag.endswith("-3")  # really multipart
    assert (
        objects["model.safetensors"].sha256
        == hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    )

    ref = ModelRef(uri=f"s3://{s3_bucket}/models/tiny")
    folder = fetch(ref, tmp_path / "cache")
    assert _same_tree(src, folder)
    assert not list(folder.rglob("*.partial"))


def test_s3_identity_changes_only_with_content(tmp_path, s3_bucket):
    src = _model_dir(tmp_path / "src")
    upload_dir(src, f"s3://{s3_bucket}/m")
    ref = ModelRef(uri=f"s3://{s3_bucket}/m")
    first = resolve(ref)
    assert first.kind == "s3" and first == resolve(ref)
    upload_dir(src, f"s3://{s3_bucket}/m")  # same content again
    assert resolve(ref) == first
    (src / "config.json").write_text('{"model_type": "llama"}')
    upload_dir(src, f"s3://{s3_bucket}/m")
    assert resolve(ref) != first


def test_endpoint_from_the_ref(tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    src = _model_dir(tmp_path / "src")
    upload_dir(src, f"s3://{s3_bucket}/m")
    monkeypatch.delenv("FUSELLM_S3_ENDPOINT_URL")
    ref = ModelRef(uri=f"s3://{s3_bucket}/m", endpoint_url=s3_endpoint)
    assert _same_tree(src, fetch(ref, tmp_path / "cache"))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


class _Interrupting:
    """An S3 client that fails after `allow` downloads, to simulate a killed fetch."""

    def __init__(self, client, allow: int):
        self.client, self.allow, self.downloads = client, allow, []

    def download_file(self, bucket, key, filename, **kw):
        if len(self.downloads) >= self.allow:
            raise KeyboardInterrupt("simulated interruption")
        self.downloads.append(key)
        return self.client.download_file(bucket, key, filename, **kw)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_fetch_resumes_after_interruption(tmp_path, s3_bucket):
    client = s3_module.s3_client()
    for i in range(3):
        client.put_object(
            Bucket=s3_bucket, Key=f"m/part-{i}.bin", Body=f"content {i}".encode() * 100
        )
    uri, folder = S3URI(s3_bucket, "m"), tmp_path / "cache"

    first = _Interrupting(client, allow=1)
    with pytest.raises(KeyboardInterrupt):
        fetch_s3(uri, folder, client=first)
    assert first.downloads == ["m/part-0.bin"]
    assert (folder / "part-0.bin").is_file() and not (folder / "part-1.bin").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]
    assert set(json.loads((folder / FETCH_STATE).read_text())) == {"part-0.bin"}
    # What a killed process leaves behind (its pid is gone) is cleaned up by the next fetch.
    dead = _dead_pid()
    (folder / f".part-1.bin.{dead}.partial").write_bytes(b"half")

    second = _Interrupting(client, allow=10)
    fetch_s3(uri, folder, client=second)
    assert second.downloads == ["m/part-1.bin", "m/part-2.bin"]  # part-0 was skipped
    assert (folder / "part-2.bin").read_bytes() == b"content 2" * 100
    assert not list(folder.glob(".*.partial"))

    # A replaced object (new ETag) is downloaded again; a deleted one disappears locally.
    client.put_object(Bucket=s3_bucket, Key="m/part-1.bin", Body=b"new")
    client.delete_object(Bucket=s3_bucket, Key="m/part-2.bin")
    third = _Interrupting(client, allow=10)
    fetch_s3(uri, folder, client=third)
    assert third.downloads == ["m/part-1.bin"]
    assert (folder / "part-1.bin").read_bytes() == b"new"
    assert not (folder / "part-2.bin").exists()


def test_tampered_cached_copy_is_reported(tmp_path, s3_bucket):
    src = _model_dir(tmp_path / "src")
    upload_dir(src, f"s3://{s3_bucket}/m")
    ref = ModelRef(uri=f"s3://{s3_bucket}/m")
    folder = fetch(ref, tmp_path / "cache")
    target = folder / "config.json"
    data = target.read_bytes()
    target.write_bytes(data[:-1] + b"!")  # same size, different content
    with pytest.raises(SourceError, match="config.json was modified after download"):
        fetch(ref, tmp_path / "cache")


def test_checksum_mismatches_are_errors(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"payload")
    good = hashlib.md5(b"payload").hexdigest()
    verify_object(f, S3Object("k", "blob", good, 7))
    with pytest.raises(SourceError, match="MD5 .* does not match the ETag"):
        verify_object(f, S3Object("k", "blob", "0" * 32, 7))
    with pytest.raises(SourceError, match="downloaded 7 bytes, the server lists 8"):
        verify_object(f, S3Object("k", "blob", good, 8))
    crc = base64.b64encode(zlib.crc32(b"payload").to_bytes(4, "big")).decode()
    verify_object(f, S3Object("k", "blob", good, 7), ServerChecks(crc32=crc))
    with pytest.raises(SourceError, match="CRC32 does not match"):
        verify_object(f, S3Object("k", "blob", good, 7), ServerChecks(crc32="AAAAAA=="))
    with pytest.raises(SourceError, match="SHA-256 does not match the server"):
        verify_object(f, S3Object("k", "blob", good, 7), ServerChecks(sha256="AAAA"))
    # SSE-KMS ETags are not MD5s: not held against the content.
    verify_object(f, S3Object("k", "blob", "0" * 32, 7), ServerChecks(etag_is_md5=False))


def test_server_checks_of_real_uploads(tmp_path, s3_bucket, small_multipart):
    client = s3_module.s3_client()
    src = _model_dir(tmp_path / "src", big=11 * 2**20)
    upload_dir(src, f"s3://{s3_bucket}/m")
    objects = {o.name: o for o in list_s3(S3URI(s3_bucket, "m"))}
    big = s3_module.server_checks(client, s3_bucket, objects["model.safetensors"])
    assert big.part_size == 5 * 2**20 and big.crc32 is None  # composite: not a whole-file CRC
    small = s3_module.server_checks(client, s3_bucket, objects["config.json"])
    assert small.part_size is None and small.crc32  # boto3 stored a CRC32; verified on fetch
    verify_object(src / "config.json", objects["config.json"], small)
    # A multipart object whose local bytes differ in one place fails the recomputed ETag.
    bad = tmp_path / "bad"
    data = bytearray((src / "model.safetensors").read_bytes())
    data[6 * 2**20] ^= 1
    bad.write_bytes(bytes(data))
    listed = objects["model.safetensors"]
    unlisted = S3Object(listed.key, listed.name, listed.etag, listed.size)  # no manifest SHA-256
    with pytest.raises(SourceError, match="multipart checksum does not match the ETag"):
        verify_object(bad, unlisted, big)


def test_object_changed_behind_the_manifest_is_an_error(tmp_path, s3_bucket):
    src = _model_dir(tmp_path / "src")
    upload_dir(src, f"s3://{s3_bucket}/m")
    s3_module.s3_client().put_object(
        Bucket=s3_bucket, Key="m/config.json", Body=b'{"model_type": "XXXX"}'
    )
    with pytest.raises(SourceError, match="SHA-256 .* recorded in fusellm-manifest.json"):
        fetch(ModelRef(uri=f"s3://{s3_bucket}/m"), tmp_path / "cache")


def test_manifest_hides_an_upload_in_progress(tmp_path, s3_bucket):
    src = _model_dir(tmp_path / "src")
    upload_dir(src, f"s3://{s3_bucket}/m")
    client = s3_module.s3_client()
    client.put_object(Bucket=s3_bucket, Key="m/half-uploaded.safetensors", Body=b"...")
    folder = fetch(ModelRef(uri=f"s3://{s3_bucket}/m"), tmp_path / "cache")
    assert not (folder / "half-uploaded.safetensors").exists()
    client.put_object(Bucket=s3_bucket, Key="bare/x.txt", Body=b"x")
    with pytest.raises(SourceError, match="no fusellm-manifest.json"):
        fetch_s3(S3URI(s3_bucket, "bare"), tmp_path / "bare", require_manifest=True)


def test_missing_s3_things_are_clear_errors(tmp_path, s3_bucket):
    with pytest.raises(SourceError, match="nothing under this prefix"):
        resolve(ModelRef(uri=f"s3://{s3_bucket}/nothing-here"))
    with pytest.raises(SourceError, match="NoSuchBucket"):
        resolve(ModelRef(uri="s3://no-such-bucket-xyz/m"))
    with pytest.raises(SourceError, match="is not a folder"):
        upload_dir(tmp_path / "missing", f"s3://{s3_bucket}/m")


def test_secrets_never_logged(tmp_path, s3_bucket, caplog):
    caplog.set_level(logging.DEBUG)
    src = _model_dir(tmp_path / "src")
    upload_dir(src, f"s3://{s3_bucket}/m")
    ref = ModelRef(uri=f"s3://{s3_bucket}/m")
    resolve(ref)
    fetch(ref, tmp_path / "cache")
    assert "fetched s3://" in caplog.text  # we did log, at least our own lines
    secret = DUMMY_ENV["AWS_SECRET_ACCESS_KEY"]
    assert secret not in caplog.text
    assert secret not in repr(ref) and secret not in repr(resolve(ref))
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes()


def test_s3_without_credentials_or_server_is_clear(tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SourceError, match="no S3 credentials; set AWS_ACCESS_KEY_ID"):
        resolve(ModelRef(uri="s3://bkt/m", endpoint_url="http://127.0.0.1:9"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("FUSELLM_S3_ENDPOINT_URL", "http://user:hunter2@127.0.0.1:9")
    with pytest.raises(SourceError, match="EndpointConnectionError") as err:
        resolve(ModelRef(uri="s3://bkt/m"))
    assert "hunter2" not in str(err.value)
