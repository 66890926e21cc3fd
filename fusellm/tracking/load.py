"""Loading a registered model back by alias (`champion` unless told otherwise)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fusellm.settings import without_credentials
from fusellm.tracking.current import TrackingError
from fusellm.tracking.registry import CHAMPION


def load_registered(
    name: str,
    alias: str = CHAMPION,
    *,
    trust_remote_code: bool = False,
    dst_path: str | os.PathLike | None = None,
):
    """Load `(model, tokenizer)` of the version of `name` that holds `alias`.

    Loads with transformers ourselves instead of `mlflow.transformers.load_model`, which turns
    on `trust_remote_code` for models whose class is not in transformers. Files are kept in
    `dst_path` when given, else removed once the weights are in memory.
    """
    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise TrackingError(
            f"no version of registered model {name!r} has alias {alias!r} "
            f"at {without_credentials(mlflow.get_tracking_uri())}: {err.message}"
        ) from None
    uri = f"models:/{name}/{version.version}"
    if dst_path is not None:
        return _load_components(
            mlflow.artifacts.download_artifacts(uri, dst_path=str(dst_path)), trust_remote_code
        )
    with tempfile.TemporaryDirectory(prefix="fusellm-model-") as tmp:
        return _load_components(
            mlflow.artifacts.download_artifacts(uri, dst_path=tmp), trust_remote_code
        )


def _load_components(local: str, trust_remote_code: bool):
    """Model and tokenizer from the folders the transformers flavor writes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(local)
    model_dir = root / "model"
    tokenizer_dir = root / "components" / "tokenizer"
    if not (model_dir / "config.json").is_file():
        raise TrackingError(f"{root} holds no transformers model (expected model/config.json)")
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(tokenizer_dir if tokenizer_dir.is_dir() else model_dir),
        trust_remote_code=trust_remote_code,
    )
    model.eval()
    return model, tokenizer
