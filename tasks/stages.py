"""One Prefect task per pipeline stage; no science here.

Cache keys are the pipeline's content keys (code version + inputs' identities + parameters)
plus the work folder, so a re-run of unchanged work is a `Cached` state that returns the finished
folder, and two work folders never share results. Steps that talk to the network (resolving and
fetching sources) retry with exponential backoff.

Prefect keeps the cached results (small: folder paths and summaries) apart from the folders
themselves; after deleting a work folder, run once with ``PREFECT_TASKS_REFRESH_CACHE=true`` so
that the tasks rebuild it instead of returning paths that no longer exist (a stage that finds
an input folder missing says so, naming it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import task
from prefect.tasks import exponential_backoff

from fusellm import pipeline
from fusellm.config import FusionConfig
from fusellm.pipeline import Artifact, ModelFiles
from fusellm.io.sources import ModelRef

NETWORK_RETRIES = 3
NETWORK_BACKOFF = exponential_backoff(backoff_factor=5)  # 5, 10, 20 s (with jitter)


def _key(stage: str, key: str, workdir: Path) -> str:
    where = hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:12]
    return f"fusellm-{stage}-{key}-{where}"


def _config_key(fn):
    """A cache_key_fn from a function of the task's parameters to a pipeline key."""

    def cache_key(context, parameters) -> str:
        stage, key = fn(parameters)
        return _key(stage, key, parameters["config"].workdir)

    return cache_key


@task(name="resolve-sources", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_BACKOFF)
def resolve_sources(config: FusionConfig) -> dict[str, str]:
    """Content identities now (never cached: this is how changes are noticed)."""
    return pipeline.resolve_identities(config)


@task(
    name="fetch-model",
    retries=NETWORK_RETRIES,
    retry_delay_seconds=NETWORK_BACKOFF,
    persist_result=True,
    cache_key_fn=_config_key(
        lambda p: (
            "fetch",
            pipeline.stage_key(
                "fetch",
                name=p["name"],
                ref=p["ref"].model_dump(mode="json"),
                identity=p["identity"],
            ),
        )
    ),
)
def fetch_model(name: str, ref: ModelRef, identity: str, config: FusionConfig) -> ModelFiles:
    return pipeline.fetch_model(name, ref, identity, config.workdir)


@task(
    name="pieces",
    persist_result=True,
    cache_key_fn=_config_key(
        lambda p: ("pieces", pipeline.pieces_key(p["config"], p["models"], p["corpus_identity"]))
    ),
)
def make_pieces(config: FusionConfig, models: list[ModelFiles], corpus_identity: str) -> Artifact:
    return pipeline.make_pieces(config, models, corpus_identity, config.workdir)


@task(
    name="extract",
    persist_result=True,
    cache_key_fn=_config_key(
        lambda p: (
            "extract",
            pipeline.extract_key(p["model"], p["pieces"], p["shard"], p["config"]),
        )
    ),
    task_run_name="extract-{model.name}-shard-{shard}",
)
def extract_shard(
    model: ModelFiles, pieces: Artifact, shard: int, config: FusionConfig
) -> Artifact:
    return pipeline.extract_shard(model, pieces, shard, config, config.workdir)


@task(
    name="merge-store",
    persist_result=True,
    cache_key_fn=_config_key(
        lambda p: (
            "store",
            pipeline.stage_key(
                "store", shards=[s.key for s in p["shards"]], pieces=p["pieces"].key
            ),
        )
    ),
)
def merge_store(shards: list[Artifact], pieces: Artifact, config: FusionConfig) -> Artifact:
    return pipeline.merge_stores(shards, pieces, config.workdir)


@task(
    name="vocab-map",
    persist_result=True,
    cache_key_fn=_config_key(
        lambda p: (
            "vocab",
            pipeline.stage_key("vocab", source=p["source"].tokenizer, target=p["target"].tokenizer),
        )
    ),
    task_run_name="vocab-map-{source.name}",
)
def vocab_map(source: ModelFiles, target: ModelFiles, config: FusionConfig) -> Artifact:
    return pipeline.vocab_map(source, target, config.workdir)


def _fuse_key(p) -> tuple[str, str]:
    return "fuse", pipeline.stage_key(
        "fuse",
        pieces=p["pieces"].key,
        target=p["target_store"].key,
        options=p["config"].fusion.model_dump(),
        sources=[[m.name, s.key, v.key] for m, s, v in p["sources"]],
    )


@task(name="fuse-data", persist_result=True, cache_key_fn=_config_key(_fuse_key))
def fuse_data(
    pieces: Artifact,
    target: ModelFiles,
    target_store: Artifact,
    sources: list[tuple[ModelFiles, Artifact, Artifact]],
    config: FusionConfig,
) -> Artifact:
    return pipeline.fuse_data(
        pieces, target, target_store, sources, config.fusion, config.workdir,
        alignment=config.alignment.method,
    )


def _train_key(p) -> tuple[str, str]:
    return "train", pipeline.train_key(p["target"], p["data"], p["config"], baseline=p["baseline"])


@task(
    name="train",
    persist_result=True,
    cache_key_fn=_config_key(_train_key),
    task_run_name="train-{label}",
)
def train_model(
    target: ModelFiles, data: Artifact, config: FusionConfig, baseline: bool, label: str
) -> Artifact:
    return pipeline.train_model(target, data, config, config.workdir, baseline=baseline)


def _evaluate_key(p) -> tuple[str, str]:
    return "evaluate", pipeline.evaluate_key(p["model_key"], p["label"], p["suite"], p["config"])


@task(
    name="evaluate",
    persist_result=True,
    cache_key_fn=_config_key(_evaluate_key),
    task_run_name="evaluate-{label}-{suite}",
)
def evaluate_model(
    model_dir: Path,
    model_key: str,
    label: str,
    suite: str,
    config: FusionConfig,
    trust_remote_code: bool = False,
) -> Artifact:
    return pipeline.evaluate_model(
        model_dir,
        model_key,
        label,
        suite,
        config,
        config.workdir,
        trust_remote_code=trust_remote_code,
    )


def _compare_key(p) -> tuple[str, str]:
    return "compare", pipeline.compare_key(p["results"])


@task(name="compare", persist_result=True, cache_key_fn=_config_key(_compare_key))
def compare_models(
    results: dict[str, dict[str, Artifact]],
    fused: str,
    baseline: str,
    sources: list[str],
    config: FusionConfig,
) -> Artifact:
    return pipeline.compare_models(results, fused, baseline, sources, config.workdir)
