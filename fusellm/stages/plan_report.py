"""What a run of a fusion would compute and why, found without computing, downloading or writing.

`pipeline.plan` walks the stages with an executor that builds nothing, but it fetches every model
(the tokenizers decide the keys), which for a Hub or S3 model means downloading its weights:
the opposite of planning before spending. `plan_fusion` walks the same stages with an executor
that takes models only from where they already are (a local folder, the Hugging Face cache at
the resolved commit, a complete S3 mirror in the work folder). When identities cannot be
resolved (offline) or a model is not local yet, the report says so and which stages it could
not look at, instead of failing.

For each unit a run would compute it gives a reason: the inputs whose keys are new (named by
their units, shards folded: ``extract-neox-shard-*``), else "never built" (no folder of that
stage for that model, suite or run exists), else "new key" with what that stage's key covers.
A unit's inputs are the keys it names (`Unit.inputs`), the data flow of docs/design.md §3.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fusellm.config import FusionConfig
from fusellm.extras import install_command, missing_extra
from fusellm.io.uris import S3URI, HubURI, SourceError
from fusellm.stages.base import STAGE_FILE, Artifact, ModelFiles, Unit
from fusellm.stages.pipeline import STAGES, STEPS, Fusion, PlanExecutor

_SHARD = re.compile(r"-shard-(\d+|all)$")


class NotLocal(SourceError):
    """A model the plan needs is not on this machine; the plan downloads nothing."""


# ---------------------------------------------------------------------------------------------
# The walk


@contextmanager
def _hub_offline():
    """Hub reads from the cache only: `fusellm.io.hub` reads HF_HUB_OFFLINE on every call."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def _s3_mirror(ref, workdir: Path) -> Path | None:
    """The work folder's mirror of an S3 model if it holds every object of the current listing
    (read as a local folder: `fusellm.io.s3.fetch_s3` would tidy and write in it)."""
    from fusellm.io.s3 import FETCH_STATE, list_s3, s3_cache_folder

    uri = ref.parsed
    folder = s3_cache_folder(Path(workdir) / "cache", uri)
    state_file = folder / FETCH_STATE
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    for obj in list_s3(uri, endpoint_url=ref.endpoint_url):
        known = state.get(obj.name) or {}
        if known.get("etag") != obj.etag or known.get("size") != obj.size:
            return None
    return folder


class LocalPlanExecutor(PlanExecutor):
    """A plan that reads models only where they already are, and remembers what it saw."""

    def __init__(self):
        super().__init__()
        self.identities: dict[str, str] = {}
        self.models: list[ModelFiles] = []

    def call(self, name: str, fn: Callable, *args):
        if name == "fetch-model":
            model = self._local_model(fn, *args)
            self.models.append(model)
            return model
        result = fn(*args)
        if name == "resolve-sources":
            self.identities = dict(result)
        return result

    def _local_model(self, fn: Callable, name: str, ref, identity: str, workdir: Path):
        parsed = ref.parsed
        who = f"target {ref.display_name}" if name == "target" else f"source {name}"
        if isinstance(parsed, HubURI):
            if identity.startswith("hub:"):  # the very commit resolved, not a stale cached one
                repo = "datasets/" * (parsed.repo_type == "dataset") + parsed.repo_id
                ref = ref.model_copy(update={"uri": f"hf://{repo}@{identity[4:]}"})
            try:
                with _hub_offline():
                    return fn(name, ref, identity, workdir)
            except Exception as err:  # noqa: BLE001 - not cached, or only partly (no tokenizer)
                raise NotLocal(
                    f"{who} ({parsed}) is not in the Hugging Face cache at that commit, "
                    f"or not completely ({_short(err)}); the plan downloads nothing, "
                    "`fusellm run` fetches it"
                ) from None
        if isinstance(parsed, S3URI):
            mirror = _s3_mirror(ref, workdir)
            if mirror is None:
                raise NotLocal(
                    f"{who} ({parsed}) has no complete mirror in {Path(workdir) / 'cache'}; "
                    "the plan downloads nothing, `fusellm run` fetches it"
                )
            ref = ref.model_copy(update={"uri": str(mirror)})  # the same files, read in place
        return fn(name, ref, identity, workdir)


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class UnitPlan:
    """One unit of stage work: whether its folder exists, and if not, why it would be built."""

    unit: Unit
    artifact: Artifact
    reason: str | None = None

    @property
    def done(self) -> bool:
        return self.artifact.done

    @property
    def label(self) -> str:
        return self.unit.label

    @property
    def group(self) -> str:
        """The label with the shard folded: ``extract-neox-shard-*``."""
        return _SHARD.sub("-shard-*", self.unit.label)


@dataclass
class PlanReport:
    """Every unit the walk reached, the identities and models it saw, and where it stopped."""

    config: FusionConfig
    units: list[UnitPlan] = field(default_factory=list)
    identities: dict[str, str] = field(default_factory=dict)
    models: list[ModelFiles] = field(default_factory=list)
    stopped: str | None = None  # why the walk could not look further

    @property
    def pending(self) -> list[UnitPlan]:
        return [u for u in self.units if not u.done]

    @property
    def nothing_to_do(self) -> bool:
        return self.stopped is None and not self.pending

    def find(self, label: str) -> UnitPlan | None:
        return next((u for u in self.units if u.label == label), None)


@contextmanager
def _tracking_of(config: FusionConfig):
    """The tracking URI a run would use (the registration key names its registry), set back
    afterwards; nothing to set where mlflow is not installed (`register_key` then says so)."""
    try:
        import mlflow
    except ModuleNotFoundError as err:
        if err.name != "mlflow":
            raise
        yield
        return
    previous = mlflow.get_tracking_uri()
    if config.tracking.tracking_uri:
        mlflow.set_tracking_uri(config.tracking.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def plan_fusion(config: FusionConfig, *, until: str = "register") -> PlanReport:
    """Walk the fusion's stages and report what is done and what a run would compute, and why.

    Nothing is built, downloaded or written; the MLflow tracking URI is set only while the
    registration key is computed, as `pipeline.plan` does. A stage whose key needs a module of
    an extra that is not installed (lm-eval for `evaluate`, mlflow for `register`) stops the
    walk there, and the report names the extra: the core alone plans the stages before it.
    """
    ex = LocalPlanExecutor()
    report = PlanReport(config)
    stages = STAGES[: STAGES.index(until) + 1]
    stage = stages[0]
    with _tracking_of(config):
        try:  # pipeline.walk, one stage at a time: a stop names its stage
            fusion = Fusion(config)
            for stage in stages:
                STEPS[stage](fusion, ex)
        except NotLocal as err:
            report.stopped = str(err)
        except Exception as err:  # noqa: BLE001 - offline, a missing path: reported, not raised
            report.stopped = _stop_reason(config, ex, err, stage)
    report.identities, report.models = ex.identities, ex.models
    report.units = [UnitPlan(u, a) for u, a in ex.units]
    _explain(report)
    return report


def _stop_reason(config: FusionConfig, ex: LocalPlanExecutor, err: Exception, stage: str) -> str:
    """Why the walk stopped; before identities were resolved, every input that cannot be."""
    if not ex.identities:
        return "identities not resolved:\n" + ("\n".join(_unresolved(config)) or _short(err))
    if missing_extra(err):
        return f"{stage}: {_short(err)}"
    return _short(err)


def _unresolved(config: FusionConfig) -> list[str]:
    """Each input whose identity cannot be resolved now, with why (all of them at once)."""
    from fusellm.io.corpus import corpus_fingerprint
    from fusellm.io.sources import resolve

    problems = []
    named = [("target", config.target), *zip(config.source_names, config.sources)]
    seen = set()
    for name, ref in named:
        if ref.uri in seen:
            continue
        seen.add(ref.uri)
        try:
            resolve(ref)
        except Exception as err:  # noqa: BLE001 - whatever the Hub client or boto3 raise
            problems.append(f"{name} {ref.uri}: {_short(err)}")
    try:
        corpus_fingerprint(config.corpus)
    except Exception as err:  # noqa: BLE001
        problems.append(f"corpus {config.corpus.uri}: {_short(err)}")
    return problems


def _short(err: Exception) -> str:
    missing = missing_extra(err, prefer=("orchestration",))
    if missing:
        return f"{missing[0]} is not installed: {install_command(missing[1])}"
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{err.__class__.__name__}: {text}" if not isinstance(err, SourceError) else text


# ---------------------------------------------------------------------------------------------
# Why a unit would be built


def _model_of(label: str, prefix: str) -> str:
    return _SHARD.sub("", label.removeprefix(prefix))


def _shard_of(label: str) -> str | None:
    match = _SHARD.search(label)
    return match[1] if match else None


def _evaluated(label: str, suites: list[str]) -> tuple[str, str]:
    """``evaluate-llama-2-7b-multipl-e`` -> ("llama-2-7b", "multipl-e")."""
    body = label.removeprefix("evaluate-")
    for suite in sorted(suites, key=len, reverse=True):
        if body.endswith(f"-{suite}"):
            return body[: -len(suite) - 1], suite
    return body, ""


# stage -> what its key holds besides its input units (docs/design.md §5); {model} is filled in
COVERS = {
    "pieces": "the corpus, a tokenizer, pieces.*, extraction.shard_size or the pieces code",
    "extract": "model {model} (its files, dtype, trust_remote_code), extraction.top_k or "
    "token_ce, pieces.block_size, or the extraction code or libraries",
    "store": "the store code",
    "vocab": "a tokenizer, fusion.vocab_map or the vocabulary code",
    "fuse": "fusion.*, alignment.method or the fusion code",
    "fused": "the fusion code",
    "train": "the target model, training.* or the training code or libraries",
    "evaluate": "model {model}, the suite's tasks or data, evaluation.limit or max_gen_toks, "
    "or the evaluation code or libraries",
    "compare": "the evaluations or the models' roles",
    "register": "the scores, tracking.registered_model, the registry or the champion rule",
}


def _explain(report: PlanReport) -> None:
    """Fill each pending unit's reason (inputs with new keys first, then its own key)."""
    built = _BuiltBefore(report.config.workdir)
    for i, item in enumerate(report.units):
        if item.done:
            continue
        changed = []
        for other in report.units[:i]:
            new = not other.done and other.unit.key in item.unit.inputs
            if new and other.group not in changed:
                changed.append(other.group)
        if changed:
            verb = "changes" if len(changed) == 1 else "change"
            item.reason = f"input {', '.join(changed)} {verb}"
        elif not built.seen(item, report.config):
            item.reason = "never built"
        elif _sibling_done(report, item):
            model = _model_name(item, report.config)
            item.reason = f"new key: model {model} changed (its files, dtype or trust_remote_code)"
        else:
            model = _model_name(item, report.config)
            covers = COVERS.get(item.unit.stage, "its parameters")
            item.reason = "new key: " + covers.format(model=model)


def _model_name(item: UnitPlan, config: FusionConfig) -> str:
    if item.unit.stage == "extract":
        return _model_of(item.label, "extract-")
    return _evaluated(item.label, config.evaluation.suites)[0]


def _sibling_done(report: PlanReport, item: UnitPlan) -> bool:
    """Whether a done unit of the same stage differs from `item` only by its model (same shard;
    same suite, a source too): then the rest of the key is unchanged, and the model changed."""
    config = report.config
    if item.unit.stage == "extract":
        shard = _shard_of(item.label)
        return any(
            o.done and o.unit.stage == "extract" and _shard_of(o.label) == shard
            for o in report.units
        )
    if item.unit.stage != "evaluate":
        return False
    sources = set(config.source_names)
    model, suite = _evaluated(item.label, config.evaluation.suites)
    others = [_evaluated(o.label, config.evaluation.suites) for o in report.units if o.done
              and o.unit.stage == "evaluate"]  # fmt: skip
    return model in sources and any(m in sources and s == suite for m, s in others)


class _BuiltBefore:
    """Finished folders of each stage in the work folder, read once (their `stage.json` info)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self._infos: dict[str, list[dict]] = {}

    def infos(self, stage: str) -> list[dict]:
        if stage not in self._infos:
            found = []
            folder = self.workdir / stage
            if folder.is_dir():
                for record in folder.glob(f"*/{STAGE_FILE}"):
                    try:
                        found.append(json.loads(record.read_text()).get("info") or {})
                    except (OSError, ValueError):
                        continue
            self._infos[stage] = found
        return self._infos[stage]

    def seen(self, item: UnitPlan, config: FusionConfig) -> bool:
        """Whether a folder of this stage was built for the same model, suite or run before."""
        stage, infos = item.unit.stage, self.infos(item.unit.stage)
        if stage == "extract":
            model = _model_of(item.label, "extract-")
            return any(i.get("model") == model for i in infos)
        if stage == "evaluate":
            label, suite = _evaluated(item.label, config.evaluation.suites)
            return any(i.get("label") == label and i.get("suite") == suite for i in infos)
        if stage == "train":
            baseline = item.label == "train-baseline"
            return any((i.get("lam") == 1.0) == baseline for i in infos)
        return bool(infos)
