"""The fused model in MLflow's registry: logged, registered, and `champion` moved when earned.

The model is logged with MLflow's transformers flavor (safetensors weights and tokenizer, a
proper MLflow model in the UI) and registered as a new version whose tags carry the primary
metric, its direction and the sources' scores. The alias `champion` moves to it only when it
beats the current champion and every source (`fusellm.tracking.champion`); otherwise the alias
`challenger` moves to it (the newest version that did not win) and it is tagged
`fusellm.role=challenger`.

Registration is idempotent per result: each version carries the key of what it registers
(`fusellm.registration_key`), and `fusellm.role` is written last, as the mark of a finished
registration. A re-run after a crash finds a version with its key: a finished one is returned
as it is, a half-registered one (killed before its role was written) is finished, so a result
never gets two versions; if two runs race to register the same result, the later version is
deleted in favour of the earlier (as is any unfinished later version a crash left).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fusellm.tracking.champion import champion_decision, check_scores
from fusellm.tracking.current import innermost_fusion, require_run
from fusellm.tracking.log import set_tags
from fusellm.tracking.runs import TAG_CODE_VERSION, code_version

CHAMPION = "champion"
CHALLENGER = "challenger"

TAG_ROLE = "fusellm.role"
TAG_METRIC = "fusellm.primary_metric"
TAG_METRIC_VALUE = "fusellm.primary_metric.value"
TAG_LOWER_IS_BETTER = "fusellm.lower_is_better"
TAG_SOURCES = "fusellm.sources"
TAG_FUSED = "fusellm.fused"
TAG_SOURCE_SCORE = "fusellm.source_score.{}"
TAG_RESULT = "fusellm.registration_key"


@dataclass(frozen=True)
class RegistrationResult:
    """What registration did: the version, whether it is champion now, and why."""

    name: str
    version: int
    is_champion: bool
    reason: str
    model_uri: str = ""


def _check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a Hugging Face model folder: config.json is missing"
        )
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{model_dir} has no *.safetensors weights; models are logged as safetensors only"
        )


def _pip_requirements() -> list[str]:
    """Pinned to what produced the model; without this the flavor adds torchvision."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in ("torch", "transformers", "tokenizers", "safetensors", "accelerate"):
        try:
            reqs.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def _model_card(model_dir: Path):
    """The folder's own card, or a minimal one: without a card MLflow asks the Hub for it."""
    from huggingface_hub import ModelCard

    readme = model_dir / "README.md"
    if readme.is_file():
        return ModelCard.load(readme)
    return ModelCard("---\nlibrary_name: transformers\ntags: [fusellm]\n---\n# FuseLLM model\n")


def _champion_score(
    client: MlflowClient, name: str, primary_metric: str, lower_is_better: bool
) -> tuple[int | None, float | None, str | None]:
    """(version, score, problem) of the current champion; problem says why it is not comparable."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None, None
    tags = champion.tags or {}
    if tags.get(TAG_METRIC) != primary_metric or tags.get(TAG_LOWER_IS_BETTER) != str(
        lower_is_better
    ):
        return (
            int(champion.version),
            None,
            (
                f"the champion (version {champion.version}) was scored on "
                f"{tags.get(TAG_METRIC)!r} (lower_is_better={tags.get(TAG_LOWER_IS_BETTER)}), "
                f"not {primary_metric!r} (lower_is_better={lower_is_better}); "
                "move the alias by hand "
                "if this version should replace it"
            ),
        )
    try:
        return int(champion.version), float(tags[TAG_METRIC_VALUE]), None
    except (KeyError, ValueError):
        return (
            int(champion.version),
            None,
            (f"the champion (version {champion.version}) has no readable {TAG_METRIC_VALUE} tag"),
        )


def log_and_register_model(
    model_dir: str | os.PathLike,
    *,
    registered_name: str,
    primary_metric: str,
    scores: Mapping[str, float],
    fused: str,
    sources: list[str],
    lower_is_better: bool,
    artifact_path: str = "model",
    trust_remote_code: bool = False,
    run_id: str | None = None,
    result_key: str | None = None,
) -> RegistrationResult:
    """Log the fused model, register a new version, decide on `champion`.

    The model is logged in `run_id`, else in the fusion run open in this process (so that the
    fusion's own run page lists the registered version, even when a stage run is active), else
    in the current run.

    `scores` maps model names to the primary metric: `scores[fused]` for the new model and
    `scores[s]` for every source. The version is tagged with the metric, its direction, its value
    and the sources' values; `champion` moves to it only if it beats every source and the
    current champion (read from the champion version's tags), else `challenger` moves to it.
    Inputs are checked before the model is loaded. With `result_key`, a version already
    registered for that key is returned (or finished, when a crash cut it short) instead.
    """
    model_dir = Path(model_dir).resolve()
    _check_model_dir(model_dir)
    checked = check_scores(scores, fused, list(sources))
    run_id = run_id or innermost_fusion() or require_run("log_and_register_model", None)
    client = MlflowClient()
    done = _versions_of(client, registered_name, result_key)
    if not done:
        number, model_uri = _log_and_register(
            model_dir, registered_name, primary_metric, checked, fused, sources,
            lower_is_better, artifact_path, trust_remote_code, run_id, result_key,
        )  # fmt: skip
        done = _versions_of(client, registered_name, result_key)
    if done:  # the earliest version of this result is the one; unfinished later ones go
        for extra in done[1:]:
            if not extra.tags.get(TAG_ROLE):
                client.delete_model_version(registered_name, extra.version)
        if done[0].tags.get(TAG_ROLE):
            result = _finished(done[0], primary_metric)
            _tag_run(result, run_id)
            return result
        number, model_uri = int(done[0].version), done[0].source  # half-registered: finish it
    return _decide(
        client, registered_name, number, model_uri, primary_metric, checked, fused, sources,
        lower_is_better, run_id,
    )  # fmt: skip


def _versions_of(client: MlflowClient, name: str, result_key: str | None) -> list:
    """Versions of `name` registered for `result_key`, oldest first (none without a key)."""
    if not result_key:
        return []
    quoted = name.replace("'", "\\'")
    found = client.search_model_versions(
        f"name = '{quoted}' and tags.`{TAG_RESULT}` = '{result_key}'"
    )
    return sorted(found, key=lambda v: int(v.version))


def _finished(version, primary_metric: str) -> RegistrationResult:
    """What an earlier, finished registration of the same result decided."""
    reason = (version.description or "").removeprefix(f"{primary_metric}: ")
    return RegistrationResult(
        version.name,
        int(version.version),
        version.tags.get(TAG_ROLE) == CHAMPION,
        f"{reason} (registered earlier for the same result)",
        version.source,
    )


def _log_and_register(
    model_dir: Path,
    registered_name: str,
    primary_metric: str,
    checked: Mapping[str, float],
    fused: str,
    sources: list[str],
    lower_is_better: bool,
    artifact_path: str,
    trust_remote_code: bool,
    run_id: str,
    result_key: str | None,
) -> tuple[int, str]:
    """Log the model in `run_id` and register it as a new version; (version, model URI)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # An absolute name_or_path also keeps MLflow from looking the model up on the Hub.
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name=artifact_path,
        task="text-generation",
        pip_requirements=_pip_requirements(),
        model_card=_model_card(model_dir),
        run_id=run_id,  # the fusion run even from a worker thread with no active run
    )
    del model
    tags = {
        TAG_METRIC: primary_metric,
        TAG_METRIC_VALUE: repr(checked[fused]),
        TAG_LOWER_IS_BETTER: str(lower_is_better),
        TAG_FUSED: fused,
        TAG_SOURCES: ",".join(sources),
        **{TAG_SOURCE_SCORE.format(s): repr(checked[s]) for s in sources},
        TAG_CODE_VERSION: code_version(),
        **({TAG_RESULT: result_key} if result_key else {}),
    }
    version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    return int(version.version), info.model_uri


def _decide(
    client: MlflowClient,
    registered_name: str,
    number: int,
    model_uri: str,
    primary_metric: str,
    checked: Mapping[str, float],
    fused: str,
    sources: list[str],
    lower_is_better: bool,
    run_id: str,
) -> RegistrationResult:
    """Move `champion` or `challenger` to the version, then tag its role (the finishing mark)."""
    score = checked[fused]
    source_scores = {s: checked[s] for s in sources}
    champ_version, champ_score, problem = _champion_score(
        client, registered_name, primary_metric, lower_is_better
    )
    if champ_version == number:  # moved here before a crash cut the registration short
        is_champion, reason = True, "became champion before an interrupted registration"
        champ_version = None
    elif problem is not None:
        is_champion, reason = False, problem
    else:
        is_champion, reason = champion_decision(score, source_scores, champ_score, lower_is_better)
    if is_champion:
        client.set_registered_model_alias(registered_name, CHAMPION, number)
        if champ_version is not None:
            reason += f"; replaces version {champ_version}"
    else:  # the newest version that did not win: `models:/<name>@challenger` loads it
        client.set_registered_model_alias(registered_name, CHALLENGER, number)
    client.update_model_version(registered_name, number, description=f"{primary_metric}: {reason}")
    client.set_model_version_tag(
        registered_name, number, TAG_ROLE, CHAMPION if is_champion else CHALLENGER
    )
    result = RegistrationResult(registered_name, number, is_champion, reason, model_uri)
    _tag_run(result, run_id)
    return result


def _tag_run(result: RegistrationResult, run_id: str) -> None:
    """The fusion run names its version: the run page lists it, even when found registered."""
    set_tags(
        {
            "fusellm.registered_model": result.name,
            "fusellm.registered_version": result.version,
            TAG_ROLE: CHAMPION if result.is_champion else CHALLENGER,
        },
        run_id=run_id,
    )
