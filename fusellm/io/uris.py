"""Source URIs: `hf://org/name@revision`, `s3://bucket/prefix`, local paths (and `file://`).

Parsing only; credentials never belong in a URI: `check_endpoint` refuses user info and
`mask_credentials` masks it before a URL reaches a log or an error message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class SourceError(ValueError):
    """A source cannot be parsed, found, fetched or verified; the message says which and why."""


class NotThere(SourceError):
    """What a config names does not exist: asking again will not help (no retry)."""


class MissingLocalPath(NotThere):
    """A local path a config names does not exist."""


class MissingObject(NotThere):
    """An S3 key or prefix a config names holds nothing (the store answered: not a failure)."""


# ---------------------------------------------------------------------------------------------
# URIs


@dataclass(frozen=True)
class HubURI:
    repo_id: str
    revision: str = "main"
    repo_type: Literal["model", "dataset"] = "model"

    def __str__(self) -> str:
        kind = "datasets/" if self.repo_type == "dataset" else ""
        return f"hf://{kind}{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class S3URI:
    bucket: str
    key: str = ""  # a key or a prefix ("folder"); empty means the whole bucket

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class LocalURI:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


URI = HubURI | S3URI | LocalURI


def parse_uri(uri: str) -> URI:
    """Parse ``hf://[datasets/]org/name[@revision]``, ``s3://bucket/prefix``, ``file://`` or a path."""
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError(
            f"empty source URI {uri!r}; expected hf://org/name, s3://bucket/prefix or a path"
        )
    uri = uri.strip()
    if uri.startswith("hf://"):
        return _parse_hub(uri)
    if uri.startswith("s3://"):
        return _parse_s3(uri)
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise SourceError(f"{uri!r}: file:// URIs must name a local path (file:///abs/path)")
        return LocalURI(Path(parts.path).expanduser())
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", uri):
        scheme = uri.split("://", 1)[0]
        raise SourceError(
            f"{uri!r}: unsupported scheme {scheme!r}; expected hf://, s3://, file:// or a local path"
        )
    return LocalURI(Path(uri).expanduser())


def _parse_hub(uri: str) -> HubURI:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    body = uri[len("hf://") :]
    repo_type = "model"
    if body.startswith("datasets/"):
        repo_type, body = "dataset", body[len("datasets/") :]
    repo_id, _, revision = body.partition("@")
    if "@" in uri and not revision:
        raise SourceError(f"{uri!r}: empty revision after '@'")
    if repo_id.count("/") > 1:
        raise SourceError(f"{uri!r}: a Hub repository id is 'org/name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise SourceError(f"{uri!r}: invalid Hub repository id {repo_id!r} ({err})") from None
    return HubURI(repo_id, revision or "main", repo_type)


def _parse_s3(uri: str) -> S3URI:
    body = uri[len("s3://") :]
    bucket, _, key = body.partition("/")
    if "@" in bucket or ":" in bucket:
        raise SourceError(
            f"{mask_credentials(uri)!r}: credentials or ports do not belong in an S3 URI; set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the endpoint URL instead"
        )
    if not _BUCKET.match(bucket):
        raise SourceError(
            f"{uri!r}: invalid S3 bucket name {bucket!r} (3-63 lowercase letters, digits, '.', '-')"
        )
    return S3URI(bucket, key)


# scheme://userinfo@ up to the last "@" before the path: a password may itself hold an "@"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")


def mask_credentials(text: str | None) -> str | None:
    """`text` with the credentials of every URL in it masked, safe for logs, reprs and params.

    `s3://user:pw@host/x` -> `s3://user:***@host/x` (the user name says whose key it was);
    `https://token@host` -> `https://***@host` (a lone user part is often a token). Works on
    whole messages too, since error texts from boto3 or MLflow may quote URLs anywhere. In
    `hf://name@revision` the "@" starts a revision, not a password, so Hub URIs stay as they are.
    """
    if not text or "@" not in text:
        return text

    def mask(match: re.Match) -> str:
        scheme = match["scheme"]
        if scheme.lower() == "hf://":
            return match[0]
        user, colon, _ = match["userinfo"].partition(":")
        return f"{scheme}{user}:***@" if colon else f"{scheme}***@"

    return _USERINFO.sub(mask, text)


def check_endpoint(url: str | None) -> str | None:
    """Refuse endpoint URLs that carry user:password: configs are logged and shown in UIs."""
    if url and urlsplit(url).netloc.count("@"):
        raise SourceError(
            f"endpoint_url {mask_credentials(url)!r} carries credentials; set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY in the environment (or a Prefect block) instead"
        )
    if url and urlsplit(url).scheme not in ("http", "https"):
        raise SourceError(f"endpoint_url {url!r} must start with http:// or https://")
    return url


class LocatedRef(BaseModel):
    """Where a model or a corpus lives: a URI, and for S3 an optional endpoint.

    Subclasses say which kind of Hub repository they accept (`hub_kind`, `hub_hint`).
    """

    # Inputs are kept out of validation errors: a mistyped URI may carry a credential.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)
    hub_kind: ClassVar[str] = "model"
    hub_hint: ClassVar[str] = "names a Hub dataset; a model is expected here"

    uri: str = Field(
        title="URI",
        description="hf://org/name[@revision] (a corpus: hf://datasets/org/name), "
        "s3://bucket/prefix, file:///path or a local path (relative to the config file)",
    )
    endpoint_url: str | None = Field(
        None,
        title="S3 endpoint URL",
        description="S3 or MinIO endpoint for s3:// URIs (default: FUSELLM_S3_ENDPOINT_URL, "
        "else AWS_ENDPOINT_URL); never credentials, which come from the environment",
    )

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, uri: str) -> str:
        parsed = parse_uri(uri)
        if isinstance(parsed, HubURI) and parsed.repo_type != cls.hub_kind:
            raise SourceError(f"{uri!r}: {cls.hub_hint}")
        return uri

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, url: str | None) -> str | None:
        return check_endpoint(url)
