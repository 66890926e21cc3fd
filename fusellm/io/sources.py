"""Where models come from: Hugging Face Hub, S3 (or MinIO) and local folders.

Three things per source, kept apart so the orchestration can use them separately:

* `resolve(ref)` gives a cheap, stable *content identity* without downloading weights, so a
  scheduled re-fusion recomputes only the sources that changed:
  Hub: the commit sha the revision points at (``HfApi.repo_info``; offline: the cached ``refs``);
  S3: a hash of the sorted (key, ETag, size) listing under the prefix;
  local: a hash of file names and sizes, the *contents* of small files and the size and mtime of
  big ones. Small files (config, tokenizer, generation settings: < 16 MiB) are what people edit in
  place, sometimes keeping size and mtime (copies with ``cp -p``, checkouts), so they are hashed.
  Weights are gigabytes: hashing them on every scheduled check would cost minutes, and replacing
  a weight file changes its mtime (or size), which is what we record.
* `fetch(ref, cache_dir)` brings the files into a local folder. Hub downloads go through
  ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_OFFLINE``, resumption); pickled
  checkpoints are never downloaded. S3 downloads are multipart, written to a temporary name,
  verified (size, ETag, the server's checksums, the upload manifest's SHA-256: `verify_object`)
  and renamed, and resumable at object granularity (`fetch_s3`). Local paths are used as they are.
* `upload_dir(folder, s3_uri)` publishes artifacts: files first, a manifest last, so readers
  never take a half-uploaded folder for a complete one.
* `load_model` / `load_tokenizer` load with safetensors only, remote code only when opted in.

Credentials are never part of a ref: boto3 reads them from the environment (or whatever the
orchestration put there from a Prefect block), huggingface_hub reads ``HF_TOKEN``. URIs carrying
user info are refused (so no config object, its ``repr``, its dump or a validation error can
hold a secret), and URLs are redacted before they reach a log or an error message.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fusellm.io.files import sha256_file
from fusellm.io.hub import fetch_hub, hub_commit
from fusellm.io.s3 import (
    FETCH_STATE,
    fetch_s3,
    list_s3,
    listing_hash,
    s3_cache_folder,
    upload_dir,  # noqa: F401  (re-exported: publishing is part of sources)
)
from fusellm.io.uris import S3URI, URI, HubURI, LocatedRef, MissingLocalPath, SourceError, parse_uri

log = logging.getLogger(__name__)

SMALL_FILE = 16 * 2**20


# ---------------------------------------------------------------------------------------------
# The reference a config names


class ModelRef(LocatedRef):
    """One source or target model, as named in a fusion config."""

    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    name: str | None = None
    document_start: str = "auto"
    document_end: str = "auto"
    chat_template: str | None = None  # Jinja; replaces the tokenizer's own (chat corpora)

    @property
    def parsed(self) -> URI:
        return parse_uri(self.uri)

    @property
    def display_name(self) -> str:
        """A short name for runs and tables: `name`, else the last part of the URI."""
        if self.name:
            return self.name
        p = self.parsed
        if isinstance(p, HubURI):
            return p.repo_id.split("/")[-1]
        if isinstance(p, S3URI):
            return p.key.rstrip("/").split("/")[-1] or p.bucket
        return p.path.name


@dataclass(frozen=True)
class ResolvedSource:
    """What a source is right now: its kind, URI and content identity (changes iff content does)."""

    kind: Literal["hub", "s3", "local"]
    uri: str
    identity: str
    detail: dict = field(default_factory=dict, compare=False, repr=False)


def resolve(ref: ModelRef, *, hub_cache: str | Path | None = None) -> ResolvedSource:
    """Content identity of a model source, without downloading weights."""
    p = ref.parsed
    if isinstance(p, HubURI):
        sha = hub_commit(p, cache_dir=hub_cache)
        return ResolvedSource("hub", str(p), f"hub:{sha}", {"commit": sha})
    if isinstance(p, S3URI):
        objects = list_s3(p, endpoint_url=ref.endpoint_url)
        return ResolvedSource(
            "s3", str(p), f"s3:{listing_hash(objects)}", {"objects": len(objects)}
        )
    return ResolvedSource("local", str(p.path), f"local:{local_identity(p.path)}")


def fetch(ref: ModelRef, cache_dir: str | Path, *, hub_cache: str | Path | None = None) -> Path:
    """A local folder holding the model's files (downloaded into `cache_dir` when remote)."""
    p = ref.parsed
    if isinstance(p, HubURI):
        return fetch_hub(p, cache_dir=hub_cache)
    if isinstance(p, S3URI):
        return fetch_s3(p, s3_cache_folder(cache_dir, p), endpoint_url=ref.endpoint_url)
    if not p.path.exists():
        raise MissingLocalPath(f"local model path {p.path} does not exist")
    return p.path


# ---------------------------------------------------------------------------------------------
# Local paths


def local_identity(path: str | Path, small: int = SMALL_FILE) -> str:
    """Hash of names and sizes, the contents of files under `small` bytes, size+mtime of others."""
    path = Path(path)
    if not path.exists():
        raise MissingLocalPath(f"local path {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        name = f.name if f == path else f.relative_to(path).as_posix()
        if name == FETCH_STATE or name.endswith(".partial"):
            continue
        h.update(f"{name}\0{st.st_size}\0".encode())
        if st.st_size < small:
            h.update(sha256_file(f).encode())
        else:
            h.update(str(st.st_mtime_ns).encode())
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading


def _torch_dtype(dtype: str):
    import torch

    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_model(path: str | Path, ref: ModelRef):
    """Causal LM from a local folder: safetensors only, remote code only if the ref opts in."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise SourceError(f"model {ref.display_name}: {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise SourceError(
            f"model {ref.display_name}: {path} has no *.safetensors weights; pickled checkpoints "
            "(*.bin, *.pt) are refused because loading them can run arbitrary code"
        )
    model = AutoModelForCausalLM.from_pretrained(
        path,
        trust_remote_code=ref.trust_remote_code,
        use_safetensors=True,
        dtype=_torch_dtype(ref.dtype),
    )
    model.eval()
    return model


def load_tokenizer(path: str | Path, ref: ModelRef):
    """The model's tokenizer from a local folder; remote code only if the ref opts in."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"tokenizer of {ref.display_name}: {path} is not a folder")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=ref.trust_remote_code)
    if ref.chat_template:  # the config's template: for a model without one, or to replace it
        tokenizer.chat_template = ref.chat_template
    return tokenizer
