"""The stages as the flows run them: tasks in order, MLflow stage runs, and a record of states.

Plain functions, shared by the end-to-end `fuse` flow and the per-stage flows. Each returns what
the next stage needs; `Report` counts each task's final state (``Completed`` = computed,
``Cached`` = reused), which is how a re-run proves it recomputed nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from prefect import get_run_logger

from fusellm import tracking
from fusellm.config import FusionConfig
from fusellm.pipeline import Artifact, ModelFiles, shard_count
from tasks import stages as t


@dataclass
class Report:
    """task name -> final state names of its runs, in the order they finished."""

    states: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, name: str, state) -> None:
        self.states[name].append(state.name)

    def computed(self) -> dict[str, int]:
        """How many runs of each task did real work (not a cache hit)."""
        return {k: sum(s != "Cached" for s in v) for k, v in self.states.items()}

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.states.items()}


def run(task, report: Report, *args, **kwargs):
    """Call a task in this thread, record its state, return its result (raising on failure)."""
    state = task(*args, return_state=True, **kwargs)
    report.add(task.name, state)
    return state.result()


def gather(task, report: Report, futures: list):
    """Wait for submitted runs of one task; record their states; return their results."""
    out = []
    for future in futures:
        future.wait()
        report.add(task.name, future.state)
        out.append(future.result())
    return out


@dataclass(frozen=True)
class Prepared:
    identities: dict[str, str]
    target: ModelFiles
    sources: list[ModelFiles]
    pieces: Artifact

    @property
    def models(self) -> list[ModelFiles]:
        """Target and sources, each distinct model once (the target is often also a source)."""
        unique = {m.identity: m for m in [self.target, *self.sources]}
        return list(unique.values())


def source_tags(identities: dict[str, str]) -> dict[str, str]:
    """MLflow tags for the revisions / ETags / hashes each input was resolved to."""
    tags = {
        "fusellm.corpus_sha256": identities["corpus"],
        "fusellm.target.revision": identities["target"],
    }
    for key, value in identities.items():
        if key.startswith("source:"):
            tags[f"fusellm.source.{key.split(':', 1)[1]}.revision"] = value
    return tags


def prepare(config: FusionConfig, report: Report) -> Prepared:
    """Resolve identities, fetch every model, cut the corpus into pieces."""
    with tracking.stage_run("prepare"):
        identities = run(t.resolve_sources, report, config)
        target = run(t.fetch_model, report, "target", config.target, identities["target"], config)
        sources = [
            run(t.fetch_model, report, name, ref, identities[f"source:{name}"], config)
            for name, ref in zip(config.source_names, config.sources)
        ]
        pieces = run(t.make_pieces, report, config, [target, *sources], identities["corpus"])
        tracking.log_metrics(
            {k: v for k, v in pieces.info.items() if isinstance(v, (int, float))}, prefix="pieces"
        )
    return Prepared(identities, target, sources, pieces)


def extract(config: FusionConfig, prepared: Prepared, report: Report) -> dict[str, Artifact]:
    """Top-k extraction, one task per model x shard (spread over workers), then one store each."""
    shards = range(shard_count(prepared.pieces, config.extraction))
    with tracking.stage_run("extract", params=config.extraction.model_dump()):
        futures = {
            m.identity: [t.extract_shard.submit(m, prepared.pieces, s, config) for s in shards]
            for m in prepared.models
        }
        stores = {}
        for model in prepared.models:
            parts = gather(t.extract_shard, report, futures[model.identity])
            stores[model.identity] = run(t.merge_store, report, parts, prepared.pieces, config)
            tracking.log_metrics(stores[model.identity].info, prefix=f"extract/{model.name}")
    return stores


def align_and_fuse(
    config: FusionConfig, prepared: Prepared, stores: dict[str, Artifact], report: Report
) -> Artifact:
    """Vocabulary maps per source, then the aligned, fused training store."""
    with tracking.stage_run("align_fuse", params=config.fusion.model_dump()):
        maps = gather(
            t.vocab_map,
            report,
            [t.vocab_map.submit(s, prepared.target, config) for s in prepared.sources],
        )
        for source, vmap in zip(prepared.sources, maps):
            tracking.log_json(vmap.info, f"vocab_maps/{source.name}.json")
            tracking.log_metrics(
                {"exact_rate": vmap.info["exact_rate"]}, prefix=f"vocab/{source.name}"
            )
        triples = [(m, stores[m.identity], v) for m, v in zip(prepared.sources, maps)]
        fused = run(
            t.fuse_data,
            report,
            prepared.pieces,
            prepared.target,
            stores[prepared.target.identity],
            triples,
            config,
        )
        for name, stats in fused.info["sources_stats"].items():
            tracking.log_metrics(stats, prefix=f"fusion/{name}")
    return fused


def train(
    config: FusionConfig,
    prepared: Prepared,
    stores: dict[str, Artifact],
    fused: Artifact,
    report: Report,
) -> dict[str, Artifact]:
    """The fused model and, when it is evaluated, the CLM baseline (lam = 1) on the same pieces."""
    runs = {"fused": (fused, False)}
    if config.evaluation.baseline:
        runs["baseline"] = (stores[prepared.target.identity], True)
    trained = {}
    for label, (data, baseline) in runs.items():
        with tracking.stage_run(
            f"train_{label}", params={"lam": 1.0 if baseline else config.training.lam}
        ):
            trained[label] = run(
                t.train_model, report, prepared.target, data, config, baseline, label
            )
            for step, loss in enumerate(trained[label].info.get("losses", []), start=1):
                tracking.log_metrics({"loss": loss}, step=step, prefix=f"train/{label}")
    return trained


def evaluate(
    config: FusionConfig, prepared: Prepared, trained: dict[str, Artifact], report: Report
) -> tuple[dict[str, dict[str, Artifact]], Artifact | None]:
    """Every suite on the fused model, the baseline and each source; then the comparison."""
    models = {
        label: (a.path / "model", a.key, config.target.trust_remote_code)
        for label, a in trained.items()
    }
    if config.evaluation.sources:
        for m in prepared.sources:
            models[m.name] = (m.path, m.identity, m.ref.trust_remote_code)
    comparison = None
    with tracking.stage_run(
        "evaluate", params={"suites": config.evaluation.suites, "limit": config.evaluation.limit}
    ):
        results: dict[str, dict[str, Artifact]] = {}
        for label, (path, key, remote) in models.items():  # one at a time: each loads a model
            for suite in config.evaluation.suites:
                result = run(t.evaluate_model, report, path, key, label, suite, config, remote)
                results.setdefault(label, {})[suite] = result
                if result.info.get("average") is not None:
                    tracking.log_metrics(
                        {result.info["primary_metric"]: result.info["average"]},
                        prefix=f"{suite}/{label}",
                    )
                tracking.log_artifact(result.path / "result", f"evaluation/{label}/{suite}")
        if "baseline" in results and config.evaluation.sources:
            comparison = run(
                t.compare_models, report, results, "fused", "baseline", config.source_names, config
            )
            tracking.log_artifact(comparison.path / "comparison.md", "comparison")
            tracking.log_artifact(comparison.path / "comparison.png", "comparison")
    _summarise_on_fusion_run(results, comparison)
    return results, comparison


def _summarise_on_fusion_run(results: dict[str, dict[str, Artifact]], comparison) -> None:
    """The headline scores and chart on the fusion's own run too, where people look first."""
    for label, suites in results.items():
        for suite, result in suites.items():
            if result.info.get("average") is not None:
                tracking.log_metrics(
                    {result.info["primary_metric"]: result.info["average"]},
                    prefix=f"{suite}/{label}",
                )
    if comparison is not None:
        tracking.log_artifact(comparison.path / "comparison.md", "comparison")
        tracking.log_artifact(comparison.path / "comparison.png", "comparison")


def log(message: str, *args) -> None:
    get_run_logger().info(message, *args)
