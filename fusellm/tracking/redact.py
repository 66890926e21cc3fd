"""What may reach the tracking store: secret keys dropped, URL credentials masked, params flat.

Parameters and tags are shown in MLflow's UI and kept in its database forever, so a config that
carries an API key or an endpoint URL with a password must be cleaned before it is logged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import PurePath
from typing import Any

from fusellm.io.uris import mask_credentials

_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "credentials")
_MAX_PARAM_CHARS = 6000  # MLflow's limit on one parameter value


def _words(key: str) -> list[str]:
    """Split `sourceA.hfToken` / `api_key` / `AWS-SECRET` into lowercase words."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]


def is_secret_key(key: str) -> bool:
    """Whether a parameter/tag name names a secret.

    Word-wise, so that `api_key`, `hf_token`, `AWS_SECRET_ACCESS_KEY`, `apikey` and `dbPassword`
    are secrets while `tokenizer`, `max_tokens` and `top_k` are not (a substring test would hide
    the tokenizer path of every source).
    """
    return any(
        word == marker or word.endswith(marker) for word in _words(key) for marker in _SECRET_WORDS
    )


def plain(obj: Any) -> Any:
    """Pydantic models, dataclasses and paths as plain JSON-able data; anything else as it is."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def redact(obj: Any) -> Any:
    """A copy of nested config data without secret keys and with URL credentials masked."""
    obj = plain(obj)
    if isinstance(obj, Mapping):
        return {str(k): redact(v) for k, v in obj.items() if not is_secret_key(str(k))}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return mask_credentials(obj)
    return obj


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> `{"training.lam": "0.9", "sources.0.name": "llama"}`, secrets removed.

    Values are strings as MLflow stores them, cut to MLflow's length limit (the full config is
    logged as `config.json` too).
    """
    flat: dict[str, str] = {}
    data = redact(params)
    items = data.items() if isinstance(data, Mapping) else enumerate(data)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (
            isinstance(value, list) and any(isinstance(v, (Mapping, list)) for v in value)
        ):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list) else str(value)
            flat[name] = (
                text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."
            )
    return flat


def clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags as MLflow stores them (strings), without secret keys, empty values or credentials."""
    return {
        str(k): mask_credentials(str(v))
        for k, v in (tags or {}).items()
        if v is not None and not is_secret_key(str(k))
    }
