"""Training configuration as data: a pydantic model loadable from YAML.

Defaults are the paper's (configs/fusellm-7b.yaml: lr 1e-5 cosine, warmup ratio 0.008, AdamW (0.9, 0.95),
weight decay 0.1, clip 1.0, global batch 128, one epoch, lambda 0.9, tau 1, ZeRO-2). Every check
that needs only the config runs here, when the file is read, so a typo never costs a model load;
checks that need the data or the launcher (world size) run in `fusellm.train.data.check_run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fusellm.io.yaml_config import describe, read_yaml


class TrainConfigError(ValueError):
    """A training config, or the inputs it is run with, cannot be used; the message says where."""


class TrainConfig(BaseModel):
    """Continual training of the target with lam * CLM + (1 - lam) * fusion loss.

    `lam = 1` is the CLM baseline: the same code path, the top-k distributions are ignored.
    `deepspeed` is merged last into the generated DeepSpeed config (e.g. CPU offload settings),
    so anything DeepSpeed accepts can be set without new fields here.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # objective
    lam: float = Field(0.9, ge=0.0, le=1.0, description="weight of the CLM term; 1 = CLM baseline")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature on the fused top-k")
    rest_bucket: bool = Field(
        False,
        title="Rest bucket",
        description="keep the probability the fused top-k dropped as one more category of the "
        "fusion loss instead of renormalising the top-k (k + 1 categories; needs temperature 1)",
    )
    # optimisation
    learning_rate: float = Field(1e-5, gt=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.008, ge=0.0, lt=1.0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping; 0 disables it")
    optimizer: Literal["torch", "deepspeed"] = Field(
        "torch", description="torch.optim.AdamW, or the AdamW DeepSpeed builds (fused on GPUs)"
    )
    # batch and length (global_batch before micro_batch: the micro_batch check reads it)
    global_batch: int = Field(128, ge=1, description="sequences per optimizer step, all ranks")
    micro_batch: int = Field(1, ge=1, description="sequences per forward pass on one rank")
    max_length: int = Field(2048, ge=2, description="longer records are truncated to this")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    seed: int = 42
    # systems
    zero_stage: int = Field(2, description="DeepSpeed ZeRO stage: 0, 1, 2 or 3")
    bf16: bool | Literal["auto"] = Field("auto", description="auto: on where the GPU has bf16")
    gradient_checkpointing: bool = True
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    trust_remote_code: bool = False
    # bookkeeping
    checkpoint_every: int = Field(500, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    sources: list[str] | None = Field(
        None, description="source names the fused data must cover (checked against its manifest)"
    )
    # across machines: how the run is scheduled, not what it computes
    nodes: int = Field(1, ge=1, description="machines the training spans, one process group")
    rendezvous: str | None = Field(
        None,
        validate_default=True,
        description="host:port of the node whose machine hosts the c10d rendezvous; needed when "
        "nodes > 1",
    )
    rendezvous_timeout: int = Field(
        600, ge=1, description="seconds a node waits for every node to join the rendezvous"
    )

    @field_validator("zero_stage")
    @classmethod
    def _known_stage(cls, stage: int) -> int:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"unknown ZeRO stage {stage}; expected 0, 1, 2 or 3")
        return stage

    @field_validator("rest_bucket")
    @classmethod
    def _rest_bucket_needs_tau_1(cls, rest: bool, info) -> bool:
        if rest and info.data.get("temperature", 1.0) != 1.0:
            raise ValueError(
                "rest_bucket keeps the teacher's probabilities as stored: it needs temperature 1 "
                "(a temperature would reshape the dropped tail too, which the store does not hold)"
            )
        return rest

    @field_validator("micro_batch")
    @classmethod
    def _divides_global(cls, micro: int, info) -> int:
        total = info.data.get("global_batch")
        if total is not None and total % micro:
            raise ValueError(f"micro_batch={micro} does not divide global_batch={total}")
        return micro

    @field_validator("rendezvous")
    @classmethod
    def _endpoint(cls, endpoint: str | None, info) -> str | None:
        nodes = info.data.get("nodes", 1)
        if endpoint is None:
            if nodes > 1:
                raise ValueError(
                    f"required when nodes > 1 (nodes = {nodes}): host:port of one of the nodes' "
                    "machines, which hosts the rendezvous and every node reaches, e.g. "
                    "train-0.example:29400"
                )
            return None
        split_endpoint(endpoint)
        return endpoint

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW betas must lie in [0, 1), got {betas}")
        return betas


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """(host, port) of a ``host:port`` rendezvous endpoint (``[::1]:29400`` for IPv6)."""
    host, sep, port = endpoint.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c.isspace() for c in host) or not port.isdigit():
        raise ValueError(f"{endpoint!r} is not host:port (e.g. train-0.example:29400)")
    if not 0 < int(port) < 65536:
        raise ValueError(f"{endpoint!r}: port {port} is not in 1-65535")
    return host, int(port)


def parse_config(data: dict | None, *, source: str = "config") -> TrainConfig:
    """Validate a mapping; errors name `source` and every bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return TrainConfig(**data)
    except ValidationError as err:
        raise TrainConfigError(f"{source}: {describe(err)}") from None


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML training config (all fields optional; unknown fields are errors)."""
    return parse_config(read_yaml(path, TrainConfigError, "training config"), source=str(path))


def as_config(config: TrainConfig | dict | str | Path | None) -> TrainConfig:
    """Accept a TrainConfig, a mapping or a YAML path (what callers of `train` have at hand)."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    return parse_config(config)
