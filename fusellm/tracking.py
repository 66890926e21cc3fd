"""MLflow tracking of a fusion: one parent run, a nested run per stage, the fused model registered.

Layout in MLflow (experiment `fusellm` by default):

- parent run (`fusion_run`): the whole config as flattened parameters (`training.lam = 0.9`)
  and as `config.json`; tags `fusellm.code_version`, `fusellm.corpus_sha256`,
  `fusellm.source.<name>.revision` and whatever the caller adds;
- nested runs (`stage_run`), tagged `fusellm.stage`: metrics, tables, charts, logs of a stage;
- the fused model, logged with MLflow's transformers flavor (safetensors weights and tokenizer,
  a proper MLflow model in the UI) and registered as a new version whose tags carry the primary
  metric, its direction and the sources' scores. The alias `champion` moves to it only when it
  beats the current champion and every source; otherwise it is tagged `fusellm.role=challenger`.

Secrets never reach the tracking store: parameter or tag keys with a word such as key, secret,
token, password or credential are dropped, and passwords inside URLs are masked.

Runs are found through MLflow's active run of the calling thread; stages that Prefect runs in
worker threads find the open fusion run of the process instead, and stages in other processes
pass `parent_run_id`. Experiments created here over a local SQLite store keep their artifacts
next to the database file, not in a `./mlruns` folder of whatever the working directory is.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from fusellm.settings import MLFLOW_ARTIFACTS

CHAMPION = "champion"
CHALLENGER = "challenger"

TAG_CODE_VERSION = "fusellm.code_version"
TAG_STAGE = "fusellm.stage"
TAG_ROLE = "fusellm.role"
TAG_METRIC = "fusellm.primary_metric"
TAG_METRIC_VALUE = "fusellm.primary_metric.value"
TAG_LOWER_IS_BETTER = "fusellm.lower_is_better"
TAG_SOURCES = "fusellm.io.sources"
TAG_FUSED = "fusellm.fused"
TAG_SOURCE_SCORE = "fusellm.source_score.{}"

_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "credentials")
_MAX_PARAM_CHARS = 6000  # MLflow's limit on one parameter value

# Fusion runs open in this process, innermost last: stages in Prefect's worker threads cannot
# see the thread-local active run of the flow's thread.
_open_fusions: list[tuple[str, str]] = []
_lock = threading.Lock()


class TrackingError(RuntimeError):
    """Tracking was asked for something it cannot do (no open run, unknown alias...)."""


# --- secrets and parameters -------------------------------------------------------------------


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


def mask_url_password(value: str) -> str:
    """`s3://user:pw@host/x` -> `s3://user:***@host/x`; any other string unchanged."""
    if "://" not in value or "@" not in value:
        return value
    try:
        parts = urlsplit(value)
        if parts.password is None:
            return value
        netloc = f"{parts.username}:***@{parts.hostname or ''}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return value


def _plain(obj: Any) -> Any:
    """Pydantic models, dataclasses and paths as plain JSON-able data."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def redact(obj: Any) -> Any:
    """A copy of nested config data without secret keys and with URL passwords masked."""
    obj = _plain(obj)
    if isinstance(obj, Mapping):
        return {str(k): redact(v) for k, v in obj.items() if not is_secret_key(str(k))}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return mask_url_password(obj)
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


def _clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {
        str(k): mask_url_password(str(v))
        for k, v in (tags or {}).items()
        if v is not None and not is_secret_key(str(k))
    }


# --- runs -------------------------------------------------------------------------------------


def code_version() -> str:
    """Package version plus git commit: which code produced a run, for reproducing it."""
    from fusellm.train.card import code_version as _code_version

    return _code_version()


def _local_artifact_root() -> Path | None:
    """For a local SQLite store: the artifact folder beside the database file."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(unquote(uri[len("sqlite:///") :]))  # "/abs/x.db", or relative to the cwd
    return db.resolve().parent / MLFLOW_ARTIFACTS


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created if missing (artifacts beside a local SQLite store)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} is deleted at {mlflow.get_tracking_uri()}: restore it "
                "(`mlflow experiments restore`) or choose another experiment name"
            )
        return found.experiment_id
    root = _local_artifact_root()
    location = None
    if root is not None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"
        location = (root / slug).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@contextmanager
def fusion_run(
    name: str,
    *,
    experiment: str = "fusellm",
    params: Mapping[str, Any] | Any | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> Iterator[str]:
    """The parent run of one fusion; yields its run id.

    `params` (a dict, pydantic model or dataclass) is logged flattened and as `config.json`,
    without secrets. The code version is always tagged. Nested inside an already active run
    (a sweep, say) rather than failing. The run ends FAILED if the block raises.
    """
    previous_uri = mlflow.get_tracking_uri() if tracking_uri else None
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment_id = ensure_experiment(experiment)
        all_tags = _clean_tags({TAG_CODE_VERSION: code_version(), **(tags or {})})
        with mlflow.start_run(
            run_name=name,
            experiment_id=experiment_id,
            tags=all_tags,
            nested=mlflow.active_run() is not None,
        ) as run:
            run_id = run.info.run_id
            with _lock:
                _open_fusions.append((run_id, experiment_id))
            try:
                if params is not None:
                    _log_config(params)
                yield run_id
            finally:
                with _lock:
                    _open_fusions.remove((run_id, experiment_id))
    finally:
        if previous_uri is not None:
            mlflow.set_tracking_uri(previous_uri)


def _log_config(params: Any) -> None:
    mlflow.log_params(flatten_params(params))
    log_json(redact(params), "config.json")


@contextmanager
def stage_run(
    stage: str,
    *,
    params: Mapping[str, Any] | Any | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    experiment: str = "fusellm",
) -> Iterator[str]:
    """A run for one stage, nested under the fusion run; yields its run id.

    The parent is, in order: `parent_run_id`, the active run of this thread, the innermost
    fusion run open in this process. With none of them the stage gets a top-level run in
    `experiment`, so a stage can be run and tracked on its own.
    """
    active = mlflow.active_run()
    if parent_run_id is None and active is not None:
        parent_run_id = active.info.run_id
    if parent_run_id is None:
        with _lock:
            if _open_fusions:
                parent_run_id = _open_fusions[-1][0]
    if parent_run_id is not None:
        experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    else:
        experiment_id = ensure_experiment(experiment)
    all_tags = _clean_tags({TAG_STAGE: stage, **(tags or {})})
    with mlflow.start_run(
        run_name=stage,
        experiment_id=experiment_id,
        nested=parent_run_id is not None,
        parent_run_id=parent_run_id,
        tags=all_tags,
    ) as run:
        if params is not None:
            mlflow.log_params(flatten_params(params))
        yield run.info.run_id


def current_run_id() -> str | None:
    """The run that logging calls in this thread write to: the active run, else the open fusion."""
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id
    with _lock:
        return _open_fusions[-1][0] if _open_fusions else None


def _require_run(what: str, run_id: str | None) -> str:
    run_id = run_id or current_run_id()
    if run_id is None:
        raise TrackingError(
            f"{what} needs an open MLflow run: call it inside fusion_run(...) or stage_run(...), "
            "or pass run_id"
        )
    return run_id


# --- logging ----------------------------------------------------------------------------------


def _metric_name(prefix: str, key: str) -> str:
    if not prefix:
        return key
    return f"{prefix}{key}" if prefix.endswith(("/", ".")) else f"{prefix}/{key}"


def log_metrics(
    metrics: Mapping[str, float],
    step: int | None = None,
    *,
    prefix: str = "",
    run_id: str | None = None,
) -> None:
    """Log numbers; `prefix="align"` turns `coverage` into `align/coverage`.

    A value that is not a real number raises before anything is logged, naming the metric.
    """
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
            raise TypeError(
                f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}"
            )
        values[_metric_name(prefix, str(key))] = float(value)
    run_id = _require_run("log_metrics", run_id)
    if values:
        now = _now_ms()
        MlflowClient().log_batch(
            run_id, metrics=[Metric(k, v, now, step or 0) for k, v in values.items()]
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_artifact(
    path: str | os.PathLike, artifact_path: str | None = None, *, run_id: str | None = None
) -> None:
    """Log a file, or a folder with its contents (under `artifact_path`, else the folder's name)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot log artifact {path}: it does not exist")
    run_id = _require_run("log_artifact", run_id)
    client = MlflowClient()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path or path.name)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def _json_default(obj: Any) -> Any:
    plain = _plain(obj)
    if plain is not obj:
        return plain
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def log_json(obj: Any, artifact_file: str, *, run_id: str | None = None) -> None:
    """Write `obj` as indented JSON to `artifact_file` (a path inside the run's artifacts)."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=True)
    MlflowClient().log_text(_require_run("log_json", run_id), text, artifact_file)


def log_text(text: str, artifact_file: str, *, run_id: str | None = None) -> None:
    """Log a text artifact (a log, a Markdown table)."""
    MlflowClient().log_text(_require_run("log_text", run_id), text, artifact_file)


def log_figure(figure: Any, artifact_file: str, *, run_id: str | None = None) -> None:
    """Log a matplotlib figure as an image artifact (`*.png`, `*.svg`...)."""
    MlflowClient().log_figure(_require_run("log_figure", run_id), figure, artifact_file)


def log_table(
    rows: Mapping[str, list] | Any, artifact_file: str, *, run_id: str | None = None
) -> None:
    """Log a table (column dict or DataFrame) as JSON that MLflow's UI shows as a table."""
    MlflowClient().log_table(_require_run("log_table", run_id), rows, artifact_file)


def set_tags(tags: Mapping[str, Any], *, run_id: str | None = None) -> None:
    """Tag the current run (secret keys dropped)."""
    run_id = _require_run("set_tags", run_id)
    client = MlflowClient()
    for key, value in _clean_tags(tags).items():
        client.set_tag(run_id, key, value)


# --- model registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: int
    is_champion: bool
    reason: str
    model_uri: str = ""


def beats(score: float, other: float, lower_is_better: bool) -> bool:
    """Strictly better: a tie does not move the champion."""
    return score < other if lower_is_better else score > other


def champion_decision(
    score: float,
    source_scores: Mapping[str, float],
    champion_score: float | None,
    lower_is_better: bool,
) -> tuple[bool, str]:
    """Whether a new version becomes champion, and why: it must beat every source and the
    current champion (when there is one)."""
    word = "lower" if lower_is_better else "higher"
    lost = [n for n, s in source_scores.items() if not beats(score, s, lower_is_better)]
    if lost:
        detail = ", ".join(f"{n}={source_scores[n]:g}" for n in lost)
        return False, f"score {score:g} does not beat source(s) {detail} ({word} is better)"
    if champion_score is not None and not beats(score, champion_score, lower_is_better):
        return (
            False,
            f"score {score:g} does not beat the champion's {champion_score:g} ({word} is better)",
        )
    against = "every source" + (
        f" and the champion ({champion_score:g})" if champion_score is not None else ""
    )
    return True, f"score {score:g} beats {against} ({word} is better)"


def _check_scores(scores: Mapping[str, float], fused: str, sources: list[str]) -> dict[str, float]:
    missing = [n for n in [fused, *sources] if n not in scores]
    if missing:
        raise ValueError(
            f"scores has no entry for {', '.join(map(repr, missing))}; expected the primary metric "
            f"of the fused model {fused!r} and of every source {sources}, got keys {sorted(scores)}"
        )
    checked = {}
    for name in [fused, *sources]:
        value = scores[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"scores[{name!r}] must be a finite number, got {value!r}")
        checked[name] = float(value)
    return checked


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
) -> RegistrationResult:
    """Log the fused model in the current run, register a new version, decide on `champion`.

    `scores` maps model names to the primary metric: `scores[fused]` for the new model and
    `scores[s]` for every source. The version is tagged with the metric, its direction, its value
    and the sources' values; `champion` moves to it only if it beats every source and the
    current champion (read from the champion version's tags), else it is tagged challenger.
    Inputs are checked before the model is loaded.
    """
    model_dir = Path(model_dir).resolve()
    _check_model_dir(model_dir)
    checked = _check_scores(scores, fused, list(sources))
    run_id = _require_run("log_and_register_model", None)
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

    score = checked[fused]
    source_scores = {s: checked[s] for s in sources}
    client = MlflowClient()
    champ_version, champ_score, problem = _champion_score(
        client, registered_name, primary_metric, lower_is_better
    )
    tags = {
        TAG_METRIC: primary_metric,
        TAG_METRIC_VALUE: repr(score),
        TAG_LOWER_IS_BETTER: str(lower_is_better),
        TAG_FUSED: fused,
        TAG_SOURCES: ",".join(sources),
        **{TAG_SOURCE_SCORE.format(s): repr(v) for s, v in source_scores.items()},
        TAG_CODE_VERSION: code_version(),
    }
    version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    number = int(version.version)
    if problem is not None:
        is_champion, reason = False, problem
    else:
        is_champion, reason = champion_decision(score, source_scores, champ_score, lower_is_better)
    if is_champion:
        client.set_registered_model_alias(registered_name, CHAMPION, number)
        if champ_version is not None:
            reason += f"; replaces version {champ_version}"
    client.set_model_version_tag(
        registered_name, number, TAG_ROLE, CHAMPION if is_champion else CHALLENGER
    )
    client.update_model_version(registered_name, number, description=f"{primary_metric}: {reason}")
    set_tags(
        {
            "fusellm.registered_model": registered_name,
            "fusellm.registered_version": number,
            TAG_ROLE: CHAMPION if is_champion else CHALLENGER,
        },
        run_id=run_id,
    )
    return RegistrationResult(registered_name, number, is_champion, reason, info.model_uri)


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
            f"at {mlflow.get_tracking_uri()}: {err.message}"
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
