"""Registration of the fused model, and the record of the last successful fusion."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.io.files import write_json_atomic
from fusellm.io.fingerprint import sha256_json
from fusellm.settings import without_credentials
from fusellm.stages.base import Artifact, Unit, stage_key


def register_key(fused: Artifact, scores: dict[str, float] | None, config: FusionConfig) -> str:
    """One registration per (model, scores, registry, champion rule)."""
    import mlflow

    return stage_key(
        "register",
        model=fused.key,
        scores=scores,
        name=config.tracking.registered_model,
        registry=without_credentials(mlflow.get_registry_uri()),  # a password may be rotated
        primary_suite=config.primary_suite,
        lower_is_better=config.lower_is_better(),
    )


def register_unit(fused: Artifact, scores: dict[str, float] | None, config: FusionConfig) -> Unit:
    """Log and register the fused model once per (model, scores, registry); champion decided there.

    Keyed like every stage, so re-running unchanged work does not pile up identical versions.
    Needs an open MLflow run (`fusellm.tracking.fusion_run`).
    """
    from fusellm import tracking

    suite = config.primary_suite

    def build(folder: Path) -> dict:
        from fusellm.evaluate.suites import get_suite

        result = tracking.log_and_register_model(
            fused.path / "model",
            registered_name=config.tracking.registered_model,
            primary_metric=f"{suite}/{get_suite(suite).primary_metric}",
            scores=scores,
            fused="fused",
            sources=config.source_names,
            lower_is_better=config.lower_is_better(),
            trust_remote_code=config.target.trust_remote_code,
            result_key=key,  # a crash between registering and finishing costs no second version
        )
        return {
            "name": result.name,
            "version": result.version,
            "is_champion": result.is_champion,
            "reason": result.reason,
            "model_uri": result.model_uri,
        }

    key = register_key(fused, scores, config)
    return Unit("register", key, "register", config.workdir, build, inputs=(fused.key,))


def config_hash(config: FusionConfig) -> str:
    """What the config asks for (sources' content aside), to tell a changed config from a rerun."""
    return sha256_json(config.model_dump(mode="json"))


def write_record(config: FusionConfig, identities: dict[str, str], summary: dict) -> Path:
    """Remember the last successful fusion of this config, for the scheduled re-fusion."""
    path = Path(config.workdir) / "runs" / f"{config_hash(config)[:24]}.json"
    write_json_atomic(path, {"identities": identities, "summary": summary, "time": time.time()})
    return path


def read_record(config: FusionConfig) -> dict | None:
    path = Path(config.workdir) / "runs" / f"{config_hash(config)[:24]}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def changed_inputs(config: FusionConfig, identities: dict[str, str]) -> list[str] | None:
    """Inputs whose identity moved since the last successful run; None when there was none."""
    record = read_record(config)
    if record is None:
        return None
    old = record["identities"]
    return sorted(k for k in set(old) | set(identities) if old.get(k) != identities.get(k))
