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
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusellm.io.corpus import CorpusRef
from fusellm.io.sources import ModelRef
from fusellm.io.uris import LocalURI, parse_uri
from fusellm.io.yaml_config import _field as field_path
from fusellm.io.yaml_config import describe, read_yaml
from fusellm.train.config import TrainConfig


class FusionConfigError(ValueError):
    """A fusion config cannot be used; the message names the file and the field.

    `problems` holds one line per problem, each naming the file and the field
    (``fusion.yaml: training.lam: ...``), so a command can list them all at once.
    """

    def __init__(self, message: str, problems: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.problems = tuple(problems) or (message,)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PiecesConfig(_Section):
    """How texts are cut: every tokenizer must fit a piece in `block_size - margin` tokens."""

    block_size: int = Field(
        2048,
        ge=16,
        title="Block size (tokens)",
        description="the models' context window: every piece fits it in every tokenizer "
        "(paper: 2048)",
    )
    margin: int = Field(
        48,
        ge=0,
        title="Margin (tokens)",
        description="tokens left free in the block for each model's special tokens (BOS, EOS); "
        "pieces are cut to at most block_size - margin tokens (paper: 48)",
    )
    workers: int | None = Field(
        None,
        ge=1,
        title="Worker processes",
        description="processes cutting texts at once; the pieces are the same whatever the "
        "number (default: the cores of this machine)",
    )

    @model_validator(mode="after")
    def _room_left(self) -> PiecesConfig:
        if self.block_size - self.margin < 8:
            raise ValueError(
                f"block_size - margin = {self.block_size - self.margin}; it must be at least 8"
            )
        return self


class ExtractionConfig(_Section):
    """Top-k extraction: what is kept per position and how work is split into tasks."""

    top_k: int = Field(
        10,
        ge=1,
        title="Top-k",
        description="next-token probabilities kept per position and model (paper: 10); each "
        "adds 3 bytes per token to every store (a 2-byte id, a 1-byte probability)",
    )
    batch_size: int = Field(
        8,
        ge=1,
        title="Batch size",
        description="pieces per forward pass; changes speed and memory, not the stored numbers",
    )
    shard_size: int = Field(
        256,
        ge=1,
        title="Shard size (pieces)",
        description="pieces per shard: one extraction task per model x shard, one "
        "align-and-fuse task per shard",
    )
    shards_per_part: int = Field(
        2,
        ge=1,
        title="Shards per part",
        description="with execution: deployments, the shards of one model that one flow run on "
        "a GPU worker extracts (the model loaded once for them); more parts spread wider",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", title="Device", description="where extraction runs; auto: cuda when available"
    )
    token_ce: bool = Field(
        True,
        title="Keep per-token CE",
        description="keep per-token CE (needed by token-level fusion; 2 bytes per token)",
    )


class AlignmentConfig(_Section):
    """Token alignment (docs/design.md §2.4): character offsets, or the published DTW for comparison."""

    method: Literal["offsets", "dtw"] = Field(
        "offsets",
        title="Alignment method",
        description="offsets: pair positions whose tokens end at the same character (linear "
        "time); dtw: the published dynamic time warping over token strings, for comparison",
    )


class FusionOptions(_Section):
    """Fusion function over the candidates (target's own + each aligned source)."""

    mode: Literal["joint", "pairwise"] = Field(
        "joint",
        title="Mode",
        description="joint: one training against every source at once (FuseLLM); pairwise: "
        "one training per source with the target (the pivot) and that source as candidates, "
        "then the pairwise models merged onto the pivot (FuseChat; the `merge` section)",
    )
    method: Literal["min_ce", "avg_ce", "avg_ce_unnormalised"] = Field(
        "min_ce",
        title="Fusion function",
        description="min_ce: the candidate of lowest CE; avg_ce: candidates mixed as published "
        "(renormalised top-k, weights softmax(exp(-CE))); avg_ce_unnormalised: an earlier variant",
    )
    granularity: Literal["sequence", "token"] = Field(
        "sequence",
        title="Granularity",
        description="sequence: one choice per piece (the paper); token: per position (needs "
        "extraction.token_ce)",
    )
    ce_unit: Literal["byte", "token"] = Field(
        "byte",
        title="CE unit",
        description="byte: compare candidates' CE in nats per byte (token counts differ across "
        "tokenizers); token: nats per token, the paper's choice",
    )
    vocab_map: Literal["prefix", "mined"] = Field(
        "prefix",
        title="Vocabulary map",
        description="prefix: the longest target token that is a prefix of the source token's "
        "text (always a valid continuation); mined: the published minimum edit distance",
    )
    next_token: Literal["map", "target"] = Field(
        "map",
        title="Source's next token",
        description="where a source's probability of the token it really reads next goes: map "
        "(through the vocabulary map, as published) or target (to the target's own next token: "
        "the same text in the target's segmentation)",
    )
    workers: int | None = Field(
        None,
        ge=1,
        title="Worker processes",
        description="align-and-fuse shards built at once, each in its own process "
        "(default: the cores of this machine)",
    )


class EvaluationConfig(_Section):
    """Which suites score which models; the CLM baseline trains only when it is evaluated."""

    suites: list[str] = Field(
        ["local"],
        min_length=1,
        title="Suites",
        description="lm-eval suites to run (fusellm/evaluate/suites.yaml): bbh, commonsense, "
        "multipl-e, local (bits per byte on held-out text in data_dir, a task per domain "
        "folder), custom (the tasks named in `tasks`)",
    )
    tasks: list[str] = Field(
        [],
        title="Custom tasks",
        description="lm-eval task, group or tag names the suite `custom` runs: any of lm-eval's, "
        "or one defined in task_dir; each is its own table in the comparison",
    )
    task_dir: Path | None = Field(
        None,
        title="Task folder",
        description="a folder of the user's own lm-eval task YAMLs (and their data files), "
        "indexed beside lm-eval's for `tasks`; its content is part of the evaluation key",
    )
    chat_template: bool = Field(
        False,
        title="Chat template",
        description="render prompts with each model's chat template (lm-eval's "
        "apply_chat_template, few-shot examples as turns); every evaluated model needs one",
    )
    data_dir: Path | None = Field(
        None,
        title="Data folder",
        description="local JSONL in the Hub layout (<data_dir>/<dataset path>/<name>/<split>"
        ".jsonl), relative to the config file; None: the Hub",
    )
    limit: float | None = Field(
        None, gt=0, title="Limit", description="documents per task (None: all)"
    )
    batch_size: int = Field(
        1, ge=1, title="Batch size", description="lm-eval batch size; changes speed, not scores"
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        title="Backend",
        description="hf: lm-eval's Hugging Face model (any device); vllm: lm-eval's vLLM model, "
        "much faster generation (BBH chain-of-thought, MultiPL-E), needs a CUDA GPU and "
        "`pip install vllm`",
    )
    max_gen_toks: int | None = Field(
        None,
        ge=1,
        title="Max generated tokens",
        description="cap on tokens generated per answer (None: each task's own setting)",
    )
    sources: bool = Field(True, title="Score sources", description="also score every source")
    baseline: bool = Field(
        True,
        title="Train and score the baseline",
        description="also train and score the CLM baseline (lam = 1)",
    )

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

    @field_validator("tasks")
    @classmethod
    def _tasks_once(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks listed twice: {tasks}")
        return tasks

    @model_validator(mode="after")
    def _custom_has_tasks(self) -> EvaluationConfig:
        """`custom` runs `tasks`: one without the other is a mistake (names are checked
        against lm-eval's index when the evaluation is planned)."""
        from fusellm.evaluate.suites import CUSTOM

        if self.tasks and CUSTOM not in self.suites:
            raise ValueError(
                f"tasks {self.tasks} run as the suite {CUSTOM!r}: add it to suites "
                f"(e.g. {self.suites + [CUSTOM]})"
            )
        if CUSTOM in self.suites and not self.tasks:
            raise ValueError(f"the suite {CUSTOM!r} runs `tasks`, and it names none")
        if self.task_dir is not None and not self.tasks:
            raise ValueError("task_dir: name the tasks to run from it in `tasks`")
        return self


class TrackingConfig(_Section):
    """MLflow: where runs go, what the fused model is registered as, how champions are chosen.

    The primary metric is the average of `primary_suite`'s own metric (e.g. bits per byte for
    `local`); `lower_is_better` defaults to what the suite declares.
    """

    # A mistyped tracking URI may carry a password: keep inputs out of validation errors.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    experiment: str = Field(
        "fusellm", title="Experiment", description="MLflow experiment the fusion run goes to"
    )
    registered_model: str = Field(
        "fusellm-fused",
        title="Registered model",
        description="MLflow registered model the fused model becomes a version of",
    )
    primary_suite: str | None = Field(
        None,
        title="Primary suite",
        description="suite whose average decides the champion (default: the first evaluation "
        "suite)",
    )
    lower_is_better: bool | None = Field(
        None,
        title="Lower is better",
        description="whether the primary metric improves downwards (default: what the suite "
        "declares)",
    )
    tracking_uri: str | None = Field(
        None,
        title="Tracking URI",
        description="MLflow tracking server or store (default: MLFLOW_TRACKING_URI, else the "
        "embedded SQLite store)",
    )
    register_model: bool = Field(
        True, title="Register the model", description="log and register the fused model"
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        """A config is logged and shown in the Prefect UI's form: no password may be in it."""
        if uri and "@" in urlsplit(uri).netloc:
            raise ValueError(
                "carries credentials; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                "(or MLFLOW_TRACKING_TOKEN) in the environment instead"
            )
        return uri


class MergeConfig(_Section):
    """Merging the pairwise fused models onto the pivot with mergekit (docs/merging.md).

    Each method takes only some of the fields; one it does not take is an error. Unset fields
    take the method's default (`fusellm.method.merge`).
    """

    method: Literal["sce", "ties", "dare_ties", "task_arithmetic", "linear"] = Field(
        "sce",
        title="Merge method",
        description="sce: FuseChat's select / calculate / erase; ties, dare_ties, "
        "task_arithmetic: task vectors (each model minus the pivot) combined as published; "
        "linear: the weighted average of the models",
    )
    select_topk: float | None = Field(
        None,
        gt=0,
        le=1,
        title="SCE: selected fraction",
        description="sce: the fraction of each matrix's elements kept, largest variance across "
        "the task vectors first, counted among those whose variance is not 0 (default 0.1, "
        "FuseChat's)",
    )
    density: float | None = Field(
        None,
        gt=0,
        le=1,
        title="Density",
        description="ties: the fraction of each task vector kept by magnitude; dare_ties: kept "
        "at random, rescaled (default 0.5)",
    )
    weight: float | list[float] | None = Field(
        None,
        title="Weights",
        description="ties, dare_ties, task_arithmetic, linear: each model's weight, one value "
        "for all or one per model (default 1/K for K models)",
    )
    scale: float | None = Field(
        None,
        title="Scale (lambda)",
        description="ties, dare_ties, task_arithmetic: the merged task vector's factor, "
        "mergekit's lambda (default 1)",
    )
    normalize: bool | None = Field(
        None,
        title="Normalise weights",
        description="ties, dare_ties, task_arithmetic, linear: divide by the sum of the weights "
        "(default mergekit's: true for ties and linear, false for dare_ties and "
        "task_arithmetic)",
    )
    seed: int | None = Field(
        None,
        ge=0,
        title="Seed",
        description="dare_ties: the seed of its random drop (default 0)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        title="Merge dtype",
        description="what the merge computes in and the merged model is saved in",
    )

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> MergeConfig:
        from fusellm.method.merge import PARAMETERS

        takes = PARAMETERS[self.method]
        for name in ("select_topk", "density", "weight", "scale", "normalize", "seed"):
            if getattr(self, name) is not None and name not in takes:
                raise ValueError(
                    f"{name}: method {self.method} does not take it; it takes {', '.join(takes)}"
                )
        return self


class PlanningConfig(_Section):
    """Hints for `fusellm plan` when a model's or the corpus's files are not at hand.

    Read by the plan's estimates only, never by a stage: no stage output depends on them.
    Figures read from files (a model's safetensors headers or config.json, a finished store)
    take precedence.
    """

    parameters: dict[str, float] = Field(
        {},
        title="Parameter counts",
        description="model name (target or source) -> parameter count, e.g. 6.74e9; used when "
        "the model's config.json is neither local nor in the Hugging Face cache",
    )
    corpus_tokens: float | None = Field(
        None,
        gt=0,
        title="Corpus tokens",
        description="tokens in the documents the fusion reads (after corpus.limit), e.g. 1.8e9; "
        "used until extraction has counted them",
    )


# Fields declared in modules whose syntax tree is part of a stage's code version
# (io/sources.py and io/corpus.py, train/: fusellm/stages/versions.py) are titled and described
# here, so that documenting a field never re-runs extraction or training. Each entry:
# field -> (title, description).
_MODEL_FIELDS = {
    "uri": (
        "Model URI",
        (
            "hf://org/name[@revision], s3://bucket/prefix or a local folder (relative to the "
            "config file) holding a causal LM in safetensors and its tokenizer"
        ),
    ),
    "trust_remote_code": (
        "Trust remote code",
        "run the modelling code shipped with the model (e.g. MPT); only for sources you trust",
    ),
    "dtype": (
        "Weights dtype",
        "dtype the weights are loaded in for extraction and evaluation (auto: as saved)",
    ),
    "name": (
        "Name",
        "short name in runs, tables and stage labels (default: the last part of the URI)",
    ),
    "document_start": (
        "Document start token",
        (
            "token before every piece, as documents began in pretraining: auto (the BOS, else "
            "the document separator; never a chat marker), a token string, or none"
        ),
    ),
    "document_end": (
        "Document end token",
        (
            "token after every piece: auto (the EOS, or the document separator such as "
            "<|endoftext|> when the EOS closes a chat turn) or a token string"
        ),
    ),
    "chat_template": (
        "Chat template",
        (
            "Jinja chat template the model reads conversations in (corpus.format: chat); "
            "default: the tokenizer's own. A model without one needs it there"
        ),
    ),
}
_CORPUS_FIELDS = {
    "uri": (
        "Corpus URI",
        (
            "a local file or folder (relative to the config file) of .txt, .jsonl or .parquet "
            "files or a saved dataset, hf://datasets/org/name[@revision], or s3://bucket/prefix"
        ),
    ),
    "text_field": (
        "Text field",
        "JSONL key or column that holds each document's text (.txt files are one document each)",
    ),
    "format": (
        "Format",
        (
            "text: documents, cut into pieces; chat: conversations (SFT records with a list "
            "of role/content messages), one piece each, the loss on assistant text only"
        ),
    ),
    "messages_field": (
        "Messages field",
        "JSONL key or column that holds each conversation's messages (format: chat)",
    ),
    "split": (
        "Split",
        "split of a dataset with several (Hub datasets: default train)",
    ),
    "limit": ("Limit", "read only the first N documents (None: all)"),
}
_TRAINING_FIELDS = {
    "lam": ("Lambda (CLM weight)", "weight of the CLM term; 1 = CLM baseline (paper: 0.9)"),
    "temperature": (
        "Temperature",
        "softmax temperature on the fused top-k (paper: 1)",
    ),
    "learning_rate": ("Learning rate", "peak learning rate of AdamW (paper: 1e-5)"),
    "lr_scheduler": ("LR schedule", "learning-rate schedule after warmup (paper: cosine)"),
    "warmup_ratio": ("Warmup ratio", "share of the steps spent warming up (paper: 0.008)"),
    "adam_betas": ("AdamW betas", "AdamW (beta1, beta2) (paper: 0.9, 0.95)"),
    "adam_eps": ("AdamW epsilon", "AdamW epsilon"),
    "weight_decay": ("Weight decay", "AdamW weight decay (paper: 0.1)"),
    "max_grad_norm": ("Gradient clipping", "gradient clipping norm; 0 disables it (paper: 1)"),
    "optimizer": (
        "Optimizer",
        "torch.optim.AdamW, or the AdamW DeepSpeed builds (fused on GPUs)",
    ),
    "global_batch": (
        "Global batch (sequences)",
        "sequences per optimizer step, all ranks (paper: 128)",
    ),
    "micro_batch": (
        "Micro batch (sequences)",
        "sequences per forward pass on one rank; must divide global_batch",
    ),
    "max_length": ("Max length (tokens)", "longer records are truncated to this"),
    "epochs": ("Epochs", "passes over the fused data (paper: 1)"),
    "max_steps": ("Max steps", "optimizer steps; overrides epochs"),
    "seed": ("Seed", "seeds torch and the data order of every epoch"),
    "zero_stage": ("ZeRO stage", "DeepSpeed ZeRO stage: 0, 1, 2 or 3 (paper: 2)"),
    "bf16": ("bf16", "train in bfloat16; auto: on where the GPU has bf16"),
    "gradient_checkpointing": (
        "Gradient checkpointing",
        "recompute activations in the backward pass: less memory, ~30% more compute",
    ),
    "deepspeed": (
        "DeepSpeed overrides",
        "merged last into the generated DeepSpeed config (e.g. CPU offload settings)",
    ),
    "trust_remote_code": (
        "Trust remote code",
        "run the target's own modelling code when loading it for training",
    ),
    "checkpoint_every": ("Checkpoint every", "optimizer steps between checkpoints"),
    "keep_checkpoints": ("Checkpoints kept", "how many recent checkpoints to keep"),
    "nodes": (
        "Nodes",
        (
            "machines the training spans: one process group over all of them (torchrun's c10d "
            "rendezvous), every GPU of each; the same weights as one machine with as many GPUs"
        ),
    ),
    "rendezvous": (
        "Rendezvous endpoint",
        (
            "host:port of one of the nodes' machines, which hosts the rendezvous, reachable "
            "from every node (e.g. train-0.example:29400); required when nodes > 1"
        ),
    ),
    "rendezvous_timeout": (
        "Rendezvous timeout (s)",
        "seconds a node waits for every node to join the rendezvous before it gives up",
    ),
    "sources": (
        "Expected sources",
        (
            "source names the fused data must cover (checked against its manifest; set by the "
            "fusion from the sources)"
        ),
    ),
}


def _describe_fields(model: type[BaseModel], fields: dict[str, tuple[str, str]]) -> None:
    """Give `model`'s fields titles and descriptions (the JSON schema, hence the Prefect form).

    A field missing here is caught by tests/test_schema.py, not at import: a run must never
    fail for want of a description.
    """
    for name, (title, description) in fields.items():
        info = model.model_fields[name]
        info.title, info.description = title, description
        if info.default_factory is not None and info.json_schema_extra is None:
            info.json_schema_extra = {"default": info.default_factory()}  # the form shows it
    model.model_rebuild(force=True)


_describe_fields(ModelRef, _MODEL_FIELDS)
_describe_fields(CorpusRef, _CORPUS_FIELDS)
_describe_fields(TrainConfig, _TRAINING_FIELDS)


class FusionConfig(BaseModel):
    """A whole fusion: models, corpus, stage options, training, evaluation and tracking."""

    # Inputs stay out of validation errors, which Prefect logs: a URI may carry a credential.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    # The fields below are declared alike on purpose: each a default, a title and a description,
    # which the Prefect form and docs/config.md show.
    name: str = Field(
        "fusion", min_length=1, title="Fusion name", description="names the MLflow run"
    )
    target: ModelRef = Field(
        title="Target model",
        description="the model trained on the fused distributions (usually one of the sources)",
    )
    sources: list[ModelRef] = Field(
        min_length=1,
        title="Source models",
        description="models whose distributions are fused; any architectures and tokenizers",
    )
    corpus: CorpusRef = Field(
        title="Corpus", description="the texts the sources are run on and the target trains on"
    )
    pieces: PiecesConfig = Field(
        PiecesConfig(), title="Pieces", description="how documents are cut into pieces"
    )
    extraction: ExtractionConfig = Field(
        ExtractionConfig(),
        title="Extraction",
        description="top-k next-token distributions of every model",
    )
    alignment: AlignmentConfig = Field(
        AlignmentConfig(), title="Alignment", description="token alignment across tokenizers"
    )
    fusion: FusionOptions = Field(
        FusionOptions(),
        title="Fusion",
        description="vocabulary maps and the fusion function over candidates",
    )
    training: TrainConfig = Field(
        TrainConfig(),
        title="Training",
        description="continual training of the target (the CLM baseline uses lam = 1)",
    )
    merge: MergeConfig = Field(
        MergeConfig(),
        title="Merge",
        description="merging the pairwise fused models onto the pivot (docs/merging.md)",
    )
    evaluation: EvaluationConfig = Field(
        EvaluationConfig(), title="Evaluation", description="which suites score which models"
    )
    tracking: TrackingConfig = Field(
        TrackingConfig(), title="Tracking", description="MLflow runs, registry and champion rule"
    )
    planning: PlanningConfig = Field(
        PlanningConfig(),
        title="Planning hints",
        description="figures `fusellm plan` uses when files are not at hand; no stage reads them",
    )
    workdir: Path = Field(
        Path("fusellm-work"),
        title="Work folder",
        description="content-addressed stage outputs, relative to the config file",
    )
    execution: Literal["in-process", "deployments"] = Field(
        "in-process",
        title="Execution",
        description="in-process: the fuse flow runs every stage itself; deployments: it runs "
        "prepare, extract, align-fuse and train as runs of their deployments, each on its "
        "work pool (extraction and training on the GPU pool; infra/README.md), which must "
        "share the work folder; extraction and evaluation fan out as parts over every GPU "
        "worker",
    )
    part_attempts: int = Field(
        3,
        ge=1,
        title="Attempts per part",
        description="with execution: deployments, how often a part whose flow run crashed (its "
        "worker lost) is started again before the fusion fails",
    )

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

    @model_validator(mode="after")
    def _pairwise_on_one_node(self) -> FusionConfig:
        if self.fusion.mode == "pairwise" and self.training.nodes > 1:
            raise ValueError(
                "fusion.mode: pairwise trains each pair on one machine (its K trainings run "
                "side by side instead); set training.nodes: 1"
            )
        return self

    @model_validator(mode="after")
    def _planning_names_models(self) -> FusionConfig:
        names = {self.target.display_name, *self.source_names}
        unknown = sorted(set(self.planning.parameters) - names)
        if unknown:
            raise ValueError(
                f"planning.parameters: {unknown} name no model; expected some of {sorted(names)}"
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


def rebase_paths(data: dict, base: Path) -> dict:
    """`data` with relative local paths (models, corpus, workdir, evaluation data and task
    folder) under `base`."""
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
    for field in ("data_dir", "task_dir"):  # the suites' data, the user's task YAMLs
        folder = evaluation.get(field) if isinstance(evaluation, dict) else None
        if isinstance(folder, str) and not Path(folder).is_absolute():
            evaluation = {**evaluation, field: str(base / folder)}
            data["evaluation"] = evaluation
    return data


def _problem(error: dict) -> str:
    """One pydantic error as `describe` words it (``sources[1].uri: ...``)."""
    message = error["msg"].removeprefix("Value error, ")
    return f"{field_path(error['loc'])}: {message}" if error["loc"] else message


def parse_fusion_config(data, *, source: str = "config", base: Path | None = None) -> FusionConfig:
    """Validate a mapping; errors name `source` and every bad field."""
    if not isinstance(data, dict):
        raise FusionConfigError(
            f"{source}: expected a mapping with target, sources and corpus, got "
            f"{type(data).__name__}"
        )
    odd = [key for key in data if not isinstance(key, str)]
    if odd:  # YAML allows any key ("? " alone is a null one); a field name is text
        raise FusionConfigError(f"{source}: field names must be text, got {odd[0]!r}")
    if base is not None:
        data = rebase_paths(data, base)
    try:
        return FusionConfig(**data)
    except ValidationError as err:
        problems = [f"{source}: {_problem(e)}" for e in err.errors()]
        raise FusionConfigError(f"{source}: {describe(err)}", problems) from None
    except ValueError as err:  # a validator's own error outside pydantic's wrapping
        raise FusionConfigError(f"{source}: {err}") from None


def load_fusion_config(path: str | Path) -> FusionConfig:
    """Read a fusion config from YAML; relative local paths are relative to the file."""
    data = read_yaml(path, FusionConfigError, "fusion config")
    return parse_fusion_config(data, source=str(path), base=Path(path).resolve().parent)
