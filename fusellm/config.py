"""One fusion, described as data: `FusionConfig`, loaded from YAML.

The whole run (sources, target, corpus, every stage's options, tracking) lives in one pydantic
model so that the Prefect UI can render it as a form, MLflow can log it as parameters, and a
typo is caught when the file is read, not an hour into extraction. Every error names the file
and the field (``fusion.yaml: training.micro_batch: ...``).

Relative local paths in a YAML file (model folders, the corpus, `workdir`, evaluation data) are
taken relative to the file's folder, so a config and its data can move together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusellm.io.corpus import CorpusRef
from fusellm.io.sources import ModelRef
from fusellm.io.uris import LocalURI, parse_uri
from fusellm.io.yaml_config import describe, read_yaml
from fusellm.train.config import TrainConfig


class FusionConfigError(ValueError):
    """A fusion config cannot be used; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PiecesConfig(_Section):
    """How texts are cut: every tokenizer must fit a piece in `block_size - margin` tokens."""

    block_size: int = Field(2048, ge=16)
    margin: int = Field(48, ge=0)

    @model_validator(mode="after")
    def _room_left(self) -> PiecesConfig:
        if self.block_size - self.margin < 8:
            raise ValueError(
                f"block_size - margin = {self.block_size - self.margin}; it must be at least 8"
            )
        return self


class ExtractionConfig(_Section):
    """Top-k extraction: what is kept per position and how work is split into tasks."""

    top_k: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(
        256, ge=1, description="pieces per shard: one extraction task per model x shard, one "
        "align-and-fuse task per shard"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    token_ce: bool = Field(True, description="keep per-token CE (needed by token-level fusion)")


class AlignmentConfig(_Section):
    """Token alignment (docs/design.md §2.4): character offsets, or the published DTW for comparison."""

    method: Literal["offsets", "dtw"] = "offsets"


class FusionOptions(_Section):
    """Fusion function over the candidates (target's own + each aligned source)."""

    method: Literal["min_ce", "avg_ce", "avg_ce_unnormalised"] = Field(
        "min_ce",
        description="min_ce: the candidate of lowest CE; avg_ce: candidates mixed as published "
        "(renormalised top-k, weights softmax(exp(-CE))); avg_ce_unnormalised: an earlier variant",
    )
    granularity: Literal["sequence", "token"] = "sequence"
    ce_unit: Literal["byte", "token"] = "byte"
    vocab_map: Literal["prefix", "mined"] = Field(
        "prefix",
        description="prefix: the longest target token that is a prefix of the source token's "
        "text (always a valid continuation); mined: the published minimum edit distance",
    )
    workers: int | None = Field(
        None, ge=1, description="align-and-fuse shards built at once, each in its own process "
        "(default: the cores of this machine)"
    )


class EvaluationConfig(_Section):
    """Which suites score which models; the CLM baseline trains only when it is evaluated."""

    suites: list[str] = Field(default_factory=lambda: ["local"], min_length=1)
    data_dir: Path | None = Field(None, description="local JSONL in the Hub layout; None: the Hub")
    limit: float | None = Field(None, gt=0, description="documents per task (None: all)")
    batch_size: int = Field(1, ge=1)
    max_gen_toks: int | None = Field(None, ge=1)
    sources: bool = Field(True, description="also score every source")
    baseline: bool = Field(True, description="also train and score the CLM baseline (lam = 1)")

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, suites: list[str]) -> list[str]:
        from fusellm.evaluate.suites import suites as known

        names = set(known())
        unknown = [s for s in suites if s not in names]
        if unknown:
            raise ValueError(f"unknown suite(s) {unknown}; expected some of {sorted(names)}")
        if len(set(suites)) != len(suites):
            raise ValueError(f"suites listed twice: {suites}")
        return suites


class TrackingConfig(_Section):
    """MLflow: where runs go, what the fused model is registered as, how champions are chosen.

    The primary metric is the average of `primary_suite`'s own metric (e.g. bits per byte for
    `local`); `lower_is_better` defaults to what the suite declares.
    """

    experiment: str = "fusellm"
    registered_model: str = "fusellm-fused"
    primary_suite: str | None = Field(None, description="default: the first evaluation suite")
    lower_is_better: bool | None = None
    tracking_uri: str | None = Field(None, description="default: the embedded SQLite store")
    register_model: bool = Field(True, description="log and register the fused model")


class FusionConfig(BaseModel):
    """A whole fusion: models, corpus, stage options, training, evaluation and tracking."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("fusion", min_length=1, description="names the MLflow run")
    target: ModelRef
    sources: list[ModelRef] = Field(min_length=1)
    corpus: CorpusRef
    pieces: PiecesConfig = PiecesConfig()
    extraction: ExtractionConfig = ExtractionConfig()
    alignment: AlignmentConfig = AlignmentConfig()
    fusion: FusionOptions = FusionOptions()
    training: TrainConfig = TrainConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    workdir: Path = Field(Path("fusellm-work"), description="content-addressed stage outputs")

    @field_validator("sources")
    @classmethod
    def _distinct_names(cls, sources: list[ModelRef]) -> list[ModelRef]:
        names = [s.display_name for s in sources]
        reserved = {"target", "fused", "baseline"}
        bad = sorted({n for n in names if names.count(n) > 1 or n in reserved})
        if bad:
            raise ValueError(
                f"source names must be distinct and not one of {sorted(reserved)}: {bad}; "
                "give each source a `name`"
            )
        return sources

    @model_validator(mode="after")
    def _primary_suite_is_evaluated(self) -> FusionConfig:
        suite = self.tracking.primary_suite
        if suite is not None and suite not in self.evaluation.suites:
            raise ValueError(
                f"tracking.primary_suite: {suite!r} is not among evaluation.suites "
                f"{self.evaluation.suites}"
            )
        if self.tracking.register_model and not self.evaluation.sources:
            raise ValueError(
                "tracking.register_model: the champion decision compares the fused model with "
                "every source, so evaluation.sources must be true (or register_model false)"
            )
        return self

    @property
    def source_names(self) -> list[str]:
        return [s.display_name for s in self.sources]

    @property
    def primary_suite(self) -> str:
        return self.tracking.primary_suite or self.evaluation.suites[0]

    def lower_is_better(self) -> bool:
        """Whether the primary metric improves downwards (the suite says so unless overridden)."""
        if self.tracking.lower_is_better is not None:
            return self.tracking.lower_is_better
        from fusellm.evaluate.suites import get_suite

        return not get_suite(self.primary_suite).higher_is_better


def _rebase(uri: str, base: Path) -> str:
    """A relative local path in a file is relative to that file's folder."""
    try:
        parsed = parse_uri(uri)
    except ValueError:
        return uri  # validation reports it with its field
    if (
        isinstance(parsed, LocalURI)
        and not uri.startswith("file://")
        and not parsed.path.is_absolute()
    ):
        return str(base / parsed.path)
    return uri


def _rebase_paths(data: dict, base: Path) -> dict:
    data = dict(data)
    for key in ("target", "corpus"):
        if isinstance(data.get(key), dict) and isinstance(data[key].get("uri"), str):
            data[key] = {**data[key], "uri": _rebase(data[key]["uri"], base)}
    if isinstance(data.get("sources"), list):
        data["sources"] = [
            {**s, "uri": _rebase(s["uri"], base)}
            if isinstance(s, dict) and isinstance(s.get("uri"), str)
            else s
            for s in data["sources"]
        ]
    data.setdefault("workdir", "fusellm-work")
    if isinstance(data.get("workdir"), str) and not Path(data["workdir"]).is_absolute():
        data["workdir"] = str(base / data["workdir"])
    evaluation = data.get("evaluation")
    data_dir = evaluation.get("data_dir") if isinstance(evaluation, dict) else None
    if isinstance(data_dir, str) and not Path(data_dir).is_absolute():
        data["evaluation"] = {**evaluation, "data_dir": str(base / evaluation["data_dir"])}
    return data


def parse_fusion_config(data, *, source: str = "config", base: Path | None = None) -> FusionConfig:
    """Validate a mapping; errors name `source` and every bad field."""
    if not isinstance(data, dict):
        raise FusionConfigError(
            f"{source}: expected a mapping with target, sources and corpus, got "
            f"{type(data).__name__}"
        )
    if base is not None:
        data = _rebase_paths(data, base)
    try:
        return FusionConfig(**data)
    except ValidationError as err:
        raise FusionConfigError(f"{source}: {describe(err)}") from None
    except ValueError as err:  # a validator's own error outside pydantic's wrapping
        raise FusionConfigError(f"{source}: {err}") from None


def load_fusion_config(path: str | Path) -> FusionConfig:
    """Read a fusion config from YAML; relative local paths are relative to the file."""
    data = read_yaml(path, FusionConfigError, "fusion config")
    return parse_fusion_config(data, source=str(path), base=Path(path).resolve().parent)
