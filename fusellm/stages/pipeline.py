"""The fusion, written once: its stages in order, what each takes and what it hands on.

Every way of running a fusion walks `walk`: the Prefect `fuse` flow and the per-stage flows
(through an executor that makes each unit a Prefect task), the library runner used by the
demo's recipe experiments (`Executor`, in this process), and the plan (`PlanExecutor`, which
builds nothing and reports which stage folders exist). What differs is only how a unit of
stage work is carried out and where its numbers are logged.

    prepare   resolve identities, fetch models, cut the corpus into pieces
    extract   top-k per model x shard, merged into one store per model
    align_fuse  vocabulary map per source, aligned and fused training store
    train     the fused model and the CLM baseline (lam = 1); pairwise: a model per source,
              merged onto the pivot
    evaluate  every suite on the fused model, the baseline and each source; the comparison
    register  the fused model in MLflow, champion or challenger
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

from fusellm.config import FusionConfig
from fusellm.stages.base import Artifact, ModelFiles, StageError, Unit, cores, run_units_in_pool
from fusellm.stages.devices import DEVICES
from fusellm.stages.evaluation import Results, compare_unit, evaluate_unit, primary_scores
from fusellm.stages.extraction import extract_unit, store_unit
from fusellm.stages.fusion import fuse_unit, fused_unit, vocab_unit
from fusellm.stages.prepare import fetch_model, pieces_unit, resolve_identities, shard_count
from fusellm.stages.registry import register_unit
from fusellm.stages.training import train_unit

STAGES = ("prepare", "extract", "align_fuse", "train", "evaluate", "register")


# ---------------------------------------------------------------------------------------------
# Where numbers go, and how units run


class NullTracker:
    """Logs nothing: the library runner and the plan."""

    def stage(self, name: str, params: dict | None = None):
        return nullcontext()

    def metrics(self, values: dict, *, prefix: str, step: int | None = None) -> None:
        pass

    def json(self, obj, artifact_file: str) -> None:
        pass

    def artifact(self, path, artifact_path: str) -> None:
        pass

    def tags(self, tags: dict) -> None:
        pass


class MlflowTracker(NullTracker):
    """Nested MLflow stage runs under the open fusion run (`fusellm.tracking`)."""

    @contextmanager
    def stage(self, name: str, params: dict | None = None):
        from fusellm import tracking

        with tracking.stage_run(name, params=params) as run_id:
            yield run_id

    def metrics(self, values: dict, *, prefix: str, step: int | None = None) -> None:
        from fusellm import tracking

        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if numbers:
            tracking.log_metrics(numbers, step=step, prefix=prefix)

    def json(self, obj, artifact_file: str) -> None:
        from fusellm import tracking

        tracking.log_json(obj, artifact_file)

    def artifact(self, path, artifact_path: str) -> None:
        from fusellm import tracking

        tracking.log_artifact(path, artifact_path)

    def tags(self, tags: dict) -> None:
        """On the open fusion run; a stage flow run on its own has none, and skips them."""
        from fusellm import tracking

        if tracking.current_run_id() is not None:
            tracking.set_tags(tags)


@dataclass
class TaskTally:
    """Stage or step name -> how each of its runs ended (``Completed``: computed,
    ``Cached``: its folder existed), in the order they finished."""

    states: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, name: str, state: str) -> None:
        self.states[name].append(state)

    def computed(self) -> dict[str, int]:
        """How many runs of each stage did real work (not a reuse)."""
        return {k: sum(s != "Cached" for s in v) for k, v in self.states.items()}

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.states.items()}


def state_name(artifact: Artifact) -> str:
    return "Cached" if artifact.reused else "Completed"


class Executor:
    """Runs every unit in this process, one after the other, logging nowhere."""

    def __init__(self, tracker: NullTracker | None = None):
        self.tracker = tracker or NullTracker()
        self.tally = TaskTally()

    def call(self, name: str, fn: Callable, *args):
        """A step that is not a stage folder (resolving identities, fetching a model)."""
        self.tally.add(name, "Completed")
        return fn(*args)

    def run(self, unit: Unit) -> Artifact:
        artifact = unit.run()
        self.tally.add(unit.stage, state_name(artifact))
        return artifact

    def run_all(self, units: list[Unit], workers: int = 1) -> list[Artifact]:
        """Independent units (shards, vocabulary maps). Units meant for a process pool run in
        up to `workers` processes at once; the others one after the other."""
        if workers > 1 and units and all(u.in_process_pool for u in units):
            artifacts = run_units_in_pool(units, workers)
        else:
            artifacts = [u.run() for u in units]
        for unit, artifact in zip(units, artifacts):
            self.tally.add(unit.stage, state_name(artifact))
        return artifacts


class PlanExecutor(Executor):
    """Builds nothing: answers each unit with its folder if finished, else a not-done artifact.

    `units` lists every unit the fusion would need, in order, with whether it is done.
    """

    def __init__(self):
        super().__init__()
        self.units: list[tuple[Unit, Artifact]] = []

    def run(self, unit: Unit) -> Artifact:
        artifact = unit.peek()
        self.units.append((unit, artifact))
        return artifact

    def run_all(self, units: list[Unit], workers: int = 1) -> list[Artifact]:
        return [self.run(u) for u in units]

    def pending(self) -> list[Unit]:
        return [u for u, a in self.units if not a.done]


# ---------------------------------------------------------------------------------------------
# The walk


@dataclass
class Fusion:
    """What the walk made so far; each stage fills its part."""

    config: FusionConfig
    identities: dict[str, str] = field(default_factory=dict)
    target: ModelFiles | None = None
    sources: list[ModelFiles] = field(default_factory=list)
    pieces: Artifact | None = None
    shards: dict[str, list[Artifact]] = field(default_factory=dict)  # model identity -> shards
    stores: dict[str, Artifact] = field(default_factory=dict)  # model identity -> merged store
    fused_data: Artifact | None = None
    pairs: dict[str, Artifact] = field(default_factory=dict)  # pairwise: source -> fused data
    trained: dict[str, Artifact] = field(default_factory=dict)  # "fused" / "baseline" / "pair-*"
    results: Results = field(default_factory=dict)
    comparison: Artifact | None = None
    scores: dict[str, float] | None = None
    registration: Artifact | None = None

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


def prepare(f: Fusion, ex: Executor) -> None:
    """Resolve identities, fetch every model, cut the corpus into pieces."""
    config = f.config
    with ex.tracker.stage("prepare"):
        f.identities = ex.call("resolve-sources", resolve_identities, config)
        workdir = config.workdir
        f.target = ex.call(
            "fetch-model", fetch_model, "target", config.target, f.identities["target"], workdir
        )
        f.sources = [
            ex.call("fetch-model", fetch_model, name, ref, f.identities[f"source:{name}"], workdir)
            for name, ref in zip(config.source_names, config.sources)
        ]
        f.pieces = ex.run(pieces_unit(config, [f.target, *f.sources], f.identities["corpus"]))
        ex.tracker.metrics(f.pieces.info, prefix="pieces")
    ex.tracker.tags(source_tags(f.identities))  # on the fusion run


def _shards(f: Fusion) -> list[int | None]:
    """Shard indices of the pieces; [None] ("all of them") in a plan made before they exist."""
    n = shard_count(f.pieces)
    return [None] if n is None else list(range(n))


def extract(f: Fusion, ex: Executor) -> None:
    """Top-k extraction, one unit per model x shard (spread over workers), then one store each."""
    config = f.config
    shards = _shards(f)
    with ex.tracker.stage("extract", params=config.extraction.model_dump()):
        units = [
            extract_unit(m, f.pieces, s, config, place=i, models=len(f.models))
            for i, m in enumerate(f.models)
            for s in shards
        ]
        try:
            done = ex.run_all(units)
        finally:
            DEVICES.release()  # the models extraction kept loaded: training needs the memory
        for i, model in enumerate(f.models):
            f.shards[model.identity] = done[i * len(shards) : (i + 1) * len(shards)]
            parts = f.shards[model.identity]
            store = ex.run(store_unit(model, parts, f.pieces, config.workdir))
            f.stores[model.identity] = store
            ex.tracker.metrics(store.info, prefix=f"extract/{model.name}")


def align_and_fuse(f: Fusion, ex: Executor) -> None:
    """Vocabulary maps per source; one align-and-fuse unit per shard (worker processes, as
    many at once as `fusion.workers`, default the cores); the fused shards joined."""
    config = f.config
    with ex.tracker.stage("align_fuse", params=config.fusion.model_dump()):
        maps = ex.run_all([vocab_unit(s, f.target, config) for s in f.sources])
        for source, vmap in zip(f.sources, maps):
            ex.tracker.json(vmap.info, f"vocab_maps/{source.name}.json")
            ex.tracker.metrics(
                {"exact_rate": vmap.info.get("exact_rate")}, prefix=f"vocab/{source.name}"
            )
        if config.fusion.mode == "joint":
            f.fused_data = _fuse(f, ex, list(zip(f.sources, maps)))
        else:  # one fused store per source, with the pivot (the target) as the other candidate
            for source, vmap in pivot_pairs(f, maps):
                f.pairs[source.name] = _fuse(f, ex, [(source, vmap)], pair=source.name)


def pivot_pairs(f: Fusion, maps: list[Artifact]) -> list[tuple[ModelFiles, Artifact]]:
    """The sources paired with the pivot in pairwise fusion: every source but the target itself
    (its pair would fuse it with itself), each with its vocabulary map."""
    pairs = [(s, m) for s, m in zip(f.sources, maps) if s.identity != f.target.identity]
    if not pairs:
        raise ValueError(
            "fusion.mode: pairwise needs a source other than the target (the pivot); the "
            f"sources are {', '.join(s.name for s in f.sources)}"
        )
    return pairs


def _fuse(
    f: Fusion, ex: Executor, sources: list[tuple[ModelFiles, Artifact]], pair: str | None = None
) -> Artifact:
    """Align-and-fuse units per shard (worker processes, `fusion.workers` at once, default the
    cores) over the target and `sources`; the fused shards joined into one training store.
    `pair`: pairwise fusion's source (it names the units)."""
    config = f.config
    units = [
        fuse_unit(
            f.pieces,
            shard,
            f.target,
            f.shards[f.target.identity][i],
            [(m, f.shards[m.identity][i], v) for m, v in sources],
            config,
        )
        for i, shard in enumerate(_shards(f))
    ]
    fused_shards = ex.run_all(
        [_of_pair(u, pair) for u in units], workers=config.fusion.workers or cores()
    )
    fused = ex.run(
        _of_pair(fused_unit(fused_shards, [v for _, v in sources], f.pieces, config), pair)
    )
    for name, stats in fused.info.get("sources_stats", {}).items():
        ex.tracker.metrics(stats, prefix=f"fusion/{name}")
    return fused


def _of_pair(unit: Unit, pair: str | None) -> Unit:
    """Pairwise fusion's units named after their pair (`fuse-pair-<source>-shard-<n>`,
    `fused-data-pair-<source>`), so that a plan tells the K fusions apart. The name only:
    the key, and so the output, is the unit's own."""
    if pair is None:
        return unit
    if unit.label == "fused-data":
        return replace(unit, label=f"fused-data-pair-{pair}")
    return replace(unit, label=unit.label.replace("fuse-", f"fuse-pair-{pair}-", 1))


def train(f: Fusion, ex: Executor) -> None:
    """The fused model and, when it is evaluated, the CLM baseline (lam = 1) on the same pieces.

    Pairwise: one model per pair (`pair-<source>`), independent trainings, then the fused model
    is their merge onto the pivot (`merge` stage; with one pair, that pair's model)."""
    config = f.config
    _check_pivot(f)
    for label, unit in training_units(f).items():
        lam = unit.spec.get("lam")
        with ex.tracker.stage(f"train_{label}", params={"lam": lam}):
            f.trained[label] = ex.run(unit)
            for step, loss in enumerate(f.trained[label].info.get("losses", []), start=1):
                ex.tracker.metrics({"loss": loss}, step=step, prefix=f"train/{label}")
    if config.fusion.mode == "pairwise":
        f.trained["fused"] = merge(f, ex, [f.trained[f"pair-{name}"] for name in f.pairs])


def training_units(f: Fusion) -> dict[str, Unit]:
    """Label -> the training unit: `fused` (joint) or `pair-<source>` (pairwise), and the
    `baseline` when it is evaluated. Independent of each other: they may run side by side."""
    config = f.config
    runs = {"fused": (f.fused_data, False, None)}
    if config.fusion.mode == "pairwise":
        runs = {f"pair-{name}": (data, False, name) for name, data in f.pairs.items()}
    if config.evaluation.baseline:
        runs["baseline"] = (f.stores[f.target.identity], True, None)
    return {
        label: train_unit(f.target, data, f.pieces, config, baseline=baseline, pair=pair)
        for label, (data, baseline, pair) in runs.items()
    }


def train_part(
    config: FusionConfig, ex: Executor, model: str, *, before: Executor | None = None
) -> Artifact:
    """One training of the fan-out (`fused`, `baseline` or `pair-<source>`), on one worker.

    `before` walks the stages before it (default `ex`), which the part finds done."""
    f = walk(config, before or ex, until="align_fuse")
    units = training_units(f)
    if model not in units:
        raise UnknownPart(f"training part: no training {model!r} here ({', '.join(units)})")
    _check_pivot(f)
    return ex.run(units[model])


def _check_pivot(f: Fusion) -> None:
    """Pairwise with more than one pair: the merge after the trainings can be done (mergekit
    installed, the pivot's architecture mergeable), checked before hours of training."""
    if f.config.fusion.mode != "pairwise" or len(f.pairs) < 2:
        return
    from fusellm.method.merge import MergeError, check_pivot

    try:
        check_pivot(f.target.path, f.target.ref.trust_remote_code)
    except (MergeError, ModuleNotFoundError) as err:
        raise StageError(f"merge: {err}") from err


def merge(f: Fusion, ex: Executor, pairwise: list[Artifact]) -> Artifact:
    """The pairwise models merged onto the pivot with mergekit (`fusellm.stages.merging`)."""
    from fusellm.stages.merging import merge_unit

    if len(pairwise) == 1:  # nothing to merge: the one pairwise model is the fused one
        return pairwise[0]
    with ex.tracker.stage("merge", params=f.config.merge.model_dump()):
        return ex.run(merge_unit(f.target, pairwise, f.config))


def evaluated_models(f: Fusion) -> dict[str, tuple]:
    """Label -> (folder, content key, the config's model it loads as): the trained models, and
    each source when sources are evaluated."""
    models = {label: (a.path / "model", a.key, f.target) for label, a in f.trained.items()}
    if f.config.evaluation.sources:
        for m in f.sources:
            models[m.name] = (m.path, m.identity, m)
    return models


def evaluate(f: Fusion, ex: Executor) -> None:
    """Every suite on the fused model, the baseline and each source; then the comparison."""
    config = f.config
    models = evaluated_models(f)
    params = {"suites": config.evaluation.suites, "limit": config.evaluation.limit}
    with ex.tracker.stage("evaluate", params=params):
        for label, (path, key, loaded_as) in models.items():  # one at a time: each loads a model
            for suite in config.evaluation.suites:
                unit = evaluate_unit(path, key, label, suite, config, loaded_as=loaded_as)
                result = ex.run(unit)
                f.results.setdefault(label, {})[suite] = result
                _log_score(ex, result, label, suite)
                if result.done:
                    ex.tracker.artifact(result.path / "result", f"evaluation/{label}/{suite}")
        if "baseline" in f.results and config.evaluation.sources:
            unit = compare_unit(f.results, "fused", "baseline", config.source_names, config.workdir)
            f.comparison = ex.run(unit)
            _log_comparison(ex, f.comparison)
    for label, suites in f.results.items():  # the headline scores on the fusion's own run too
        for suite, result in suites.items():
            _log_score(ex, result, label, suite)
    if f.comparison is not None:
        _log_comparison(ex, f.comparison)
    f.scores = primary_scores(f.results, config.primary_suite)


def _log_score(ex: Executor, result: Artifact, label: str, suite: str) -> None:
    if result.info.get("average") is not None:
        metric = {result.info["primary_metric"]: result.info["average"]}
        ex.tracker.metrics(metric, prefix=f"{suite}/{label}")


def _log_comparison(ex: Executor, comparison: Artifact) -> None:
    if comparison.done:
        ex.tracker.artifact(comparison.path / "comparison.md", "comparison")
        ex.tracker.artifact(comparison.path / "comparison.png", "comparison")


def register(f: Fusion, ex: Executor) -> None:
    """Log and register the fused model; tag the fusion run with the version and its role."""
    if not f.config.tracking.register_model:
        return
    with ex.tracker.stage("register"):
        f.registration = ex.run(register_unit(f.trained["fused"], f.scores, f.config))
    info = f.registration.info
    if info:
        ex.tracker.tags(
            {
                "fusellm.registered_version": info["version"],
                "fusellm.role": "champion" if info["is_champion"] else "challenger",
            }
        )


STEPS = {
    "prepare": prepare,
    "extract": extract,
    "align_fuse": align_and_fuse,
    "train": train,
    "evaluate": evaluate,
    "register": register,
}


class UnknownPart(ValueError):
    """A unit of fan-out work names a model or suite the fusion does not have."""


def extract_part(
    config: FusionConfig,
    ex: Executor,
    model: str,
    shards: list[int],
    *,
    before: Executor | None = None,
) -> list[Artifact]:
    """One unit of extraction fan-out: `model` (a model's name) over `shards`, on one worker.

    The stages before are found done (the shared work folder); `before` walks them (default
    `ex`). The part has its machine to itself: its shards go round robin over every GPU the
    worker sees, the model loaded once per GPU for all of them (`fusellm.stages.devices`).
    """
    f = Fusion(config)
    prepare(f, before or ex)
    names = [m.name for m in f.models]
    if model not in names:
        raise UnknownPart(
            f"extraction part: no model {model!r} in this fusion ({', '.join(names)})"
        )
    place = names.index(model)
    n = shard_count(f.pieces)
    wrong = [s for s in shards if n is None or not 0 <= s < n]
    if wrong:
        raise UnknownPart(f"extraction part: shards {wrong} out of range (the pieces have {n})")
    units = [extract_unit(f.models[place], f.pieces, s, config) for s in shards]
    try:
        return ex.run_all(units)
    finally:
        DEVICES.release()


def evaluate_part(
    config: FusionConfig, ex: Executor, model: str, suite: str, *, before: Executor | None = None
) -> Artifact:
    """One unit of evaluation fan-out: `model` (fused, baseline or a source) on `suite`;
    `before` walks the stages before it (default `ex`), which the part finds done."""
    f = walk(config, before or ex, until="train")
    models = evaluated_models(f)
    if model not in models:
        raise UnknownPart(f"evaluation part: no model {model!r} here ({', '.join(models)})")
    if suite not in config.evaluation.suites:
        raise UnknownPart(
            f"evaluation part: suite {suite!r} is not in evaluation.suites "
            f"({', '.join(config.evaluation.suites)})"
        )
    path, key, loaded_as = models[model]
    return ex.run(evaluate_unit(path, key, model, suite, config, loaded_as=loaded_as))


def walk(config: FusionConfig, ex: Executor, *, until: str = "register") -> Fusion:
    """Run the stages in order up to and including `until`."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; expected one of {', '.join(STAGES)}")
    f = Fusion(config)
    for name in STAGES[: STAGES.index(until) + 1]:
        STEPS[name](f, ex)
    return f


def plan(config: FusionConfig, *, until: str = "register") -> PlanExecutor:
    """Which stage units a fusion needs and which are already done; nothing is built.

    Models are fetched (their tokenizers decide the keys); nothing else is read or written.
    """
    import mlflow

    ex = PlanExecutor()
    previous = mlflow.get_tracking_uri()
    if config.tracking.tracking_uri:  # the registry it would register in is part of a key
        mlflow.set_tracking_uri(config.tracking.tracking_uri)
    try:
        walk(config, ex, until=until)
    finally:
        mlflow.set_tracking_uri(previous)
    return ex
