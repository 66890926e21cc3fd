"""What a fusion costs before it runs: tokens, top-k store bytes, FLOPs and GPU-hours.

Everything comes from what is on this machine, so a plan works offline: a model's parameter count
from its safetensors headers (exact) or its config.json (the usual transformer arithmetic), in a
local folder, the Hugging Face cache or the work folder's S3 mirror; else `planning.parameters`.
Corpus tokens from finished extraction stores (exact), else `planning.corpus_tokens`, else a
local corpus's size at ~4 bytes per token. Each figure says where it came from.

The arithmetic (docs/planning.md): extraction is one forward pass per model, 2·N·T FLOPs; training
is 6·N·T per run (forward and backward; gradient checkpointing's recomputation and attention are
not counted, as usual for MFU); a store (`fusellm.data.store`, format 2: zstd-compressed streams)
is planned at `store_bytes_per_token`, 24 bytes a token at k = 10, 25.5 with per-token CE, an
upper figure for what `benchmarks/bench_store.py` measures on model-shaped synthetic data. The
fused store is the same format in the target's vocabulary, without per-token CE.
GPU-hours = FLOPs / (MFU · peak).

On a cluster of M nodes x N GPUs per node (`fusellm plan --gpus N --nodes M`),
`cluster_estimate` turns the GPU-hours into wall-clock hours per stage and adds up what the
shared work folder must hold.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from fusellm.config import FusionConfig
from fusellm.io.sources import ModelRef
from fusellm.io.uris import S3URI, HubURI, LocalURI, parse_uri

BYTES_PER_TOKEN_GUESS = 4.0  # UTF-8 bytes per token of English text for 32k-50k vocabularies
RECORD_BYTES = np.dtype(np.int64).itemsize + np.dtype(np.float32).itemsize  # offset + ce
APPLIES = {"bytes": {"extract", "fuse"}, "flops": {"extract", "train"}}  # what each stage costs
# CPU work per CPU-second of the two corpus-sized CPU stages, measured by benchmarks/bench_scale.py
# (docs/scaling.md, 8 MB of text, three tokenizers): bytes of corpus text cut into pieces, and
# bytes of corpus text aligned and fused. Both stages run one process per core by default.
PIECES_BYTES_PER_CPU_S = 457_930
FUSE_BYTES_PER_CPU_S = 309_094
GATED_MLP = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "phi3"}


# ---------------------------------------------------------------------------------------------
# Store format


def store_bytes_per_token(top_k: int, token_ce: bool) -> float:
    """Bytes one token is planned to take in a top-k store (`fusellm.data.store`, format 2),
    the 12 bytes per piece (`RECORD_BYTES`) aside: 2 + 2.2 per top-k rank, 1.5 more with
    per-token CE; 24 at k = 10, 25.5 with per-token CE.

    Format 2 compresses, so what a store takes depends on its data. The figure is an upper
    bound, with 6-40 % to spare, of what the store writes on SYNTHETIC data shaped like a real
    model's output (`benchmarks/bench_store.py`'s: Zipf ids, the next token often the top-1),
    measured at k = 1, 10 and 32 for 32,000 to 262,144 vocabulary entries, with and without
    per-token CE (k = 10 with per-token CE: 21.7 bytes at 32,000 entries, 24.0 at 262,144, in
    shards of ~8,000 tokens; larger shards take a little less, 21.8-23.6 in the benchmark's).
    It holds for every vocabulary size measured, so the vocabulary is not needed. Real models'
    outputs were not measured. Ids no model produces, uniformly random over the vocabulary, take
    more: ~32 bytes at k = 10 with per-token CE and 32,000 entries, ~36 at 262,144 (format 1's
    plain arrays took 34 and 56).
    """
    return 2.0 + 2.2 * top_k + (1.5 if token_ce else 0.0)


# ---------------------------------------------------------------------------------------------
# Models


def model_folder(ref: ModelRef, workdir: Path, identity: str | None = None) -> Path | None:
    """The model's files if they are on this machine already; nothing is downloaded."""
    uri = ref.parsed
    if isinstance(uri, LocalURI):
        return uri.path if uri.path.is_dir() else None
    if isinstance(uri, HubURI):
        from huggingface_hub import constants, try_to_load_from_cache

        cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE  # as fusellm.io.hub
        revision = identity[4:] if identity and identity.startswith("hub:") else uri.revision
        found = try_to_load_from_cache(
            uri.repo_id, "config.json", cache_dir=cache, revision=revision
        )
        return Path(found).parent if isinstance(found, str) else None
    if isinstance(uri, S3URI):
        from fusellm.io.s3 import s3_cache_folder

        folder = s3_cache_folder(Path(workdir) / "cache", uri)
        return folder if (folder / "config.json").is_file() else None
    return None


def _safetensors_parameters(folder: Path) -> int | None:
    """Exact count from the safetensors headers (a few KB each), if every shard is present."""
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text()).get("weight_map", {}).values())
        if not wanted or not all((folder / f).is_file() for f in wanted):
            return None
        files = [folder / f for f in sorted(wanted)]
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def _first(cfg: dict, *keys):
    return next((cfg[k] for k in keys if isinstance(cfg.get(k), (int, float))), None)


def config_parameters(cfg: dict) -> int | None:
    """Parameters of a decoder-only transformer from its config.json (within ~1 %).

    Per layer: attention 2·d² + 2·d·d_kv (grouped KV heads), MLP 3·d·f when gated (SwiGLU),
    else 2·d·f; embeddings V·d, twice when the output layer is not tied. Norms and biases are
    left out (< 0.1 %).
    """
    d = _first(cfg, "hidden_size", "d_model", "n_embd")
    layers = _first(cfg, "num_hidden_layers", "n_layers", "n_layer")
    vocab = _first(cfg, "vocab_size")
    if not (d and layers and vocab):
        return None
    ffn = _first(cfg, "intermediate_size", "n_inner", "ffn_dim")
    if ffn is None:
        ffn = d * (_first(cfg, "expansion_ratio") or 4)
    heads = _first(cfg, "num_attention_heads", "n_heads", "n_head") or 1
    kv_heads = _first(cfg, "num_key_value_heads") or heads
    d_kv = d * kv_heads / heads
    gated = cfg.get("model_type") in GATED_MLP or cfg.get("hidden_act") == "silu"
    per_layer = 2 * d * d + 2 * d * d_kv + (3 if gated else 2) * d * ffn
    tied = cfg.get("tie_word_embeddings", True) is not False
    return int(layers * per_layer + vocab * d * (1 if tied else 2))


@dataclass
class ModelEstimate:
    """One distinct model of the fusion: its size, where that figure came from, its roles.

    `name` is the one its stage labels use: a source's name, or "target" for a target that is
    not also a source (`fusellm.stages.pipeline.Fusion.models`).
    """

    name: str
    uri: str
    roles: list[str]
    parameters: float | None = None
    parameters_from: str = "unknown"
    vocab_size: int | None = None
    tokens: float | None = None  # in its own tokenizer
    tokens_from: str = "unknown"


@dataclass(frozen=True)
class DistinctModel:
    name: str
    ref: ModelRef
    roles: tuple[str, ...]
    names: tuple[str, ...]  # every name the config gives it (planning.parameters keys)


def distinct_models(config: FusionConfig) -> list[DistinctModel]:
    """Each model extracted once: a source loaded like the target is the target."""
    models: dict[tuple, DistinctModel] = {}
    named = [("target", config.target.display_name, config.target)]
    named += [("source", n, r) for n, r in zip(config.source_names, config.sources)]
    for role, name, ref in named:
        key = (ref.uri, ref.dtype, ref.trust_remote_code)
        old = models.get(key)
        if old is None:
            label = "target" if role == "target" else name
            models[key] = DistinctModel(label, ref, (role,), (name,))
        else:
            label = name if role == "source" else old.name
            models[key] = DistinctModel(label, old.ref, (*old.roles, role), (*old.names, name))
    return list(models.values())


def describe_model(model: DistinctModel, config: FusionConfig, identity: str | None = None):
    """Parameters and vocabulary of one model, from its files if here, else the hint."""
    out = ModelEstimate(model.name, model.ref.uri, list(model.roles))
    folder = model_folder(model.ref, config.workdir, identity)
    cfg = {}
    if folder is not None and (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
        out.vocab_size = _first(cfg, "vocab_size")
    exact = _safetensors_parameters(folder) if folder is not None else None
    counted = config_parameters(cfg) if cfg else None
    hints = [config.planning.parameters[n] for n in model.names if n in config.planning.parameters]
    if exact:
        out.parameters, out.parameters_from = float(exact), "safetensors headers"
    elif counted:
        out.parameters, out.parameters_from = float(counted), "config.json"
    elif hints:
        out.parameters, out.parameters_from = hints[0], "planning.parameters"
    return out


# ---------------------------------------------------------------------------------------------
# Corpus


def local_corpus_bytes(config: FusionConfig) -> int | None:
    """Size of a local corpus's files (the documents, plus JSON or Parquet framing)."""
    uri = parse_uri(config.corpus.uri)
    if not isinstance(uri, LocalURI) or not uri.path.exists():
        return None
    path = uri.path
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Row:
    """One piece of work: what it reads and writes and what it costs."""

    stage: str
    what: str
    tokens: float | None
    bytes: float | None = None
    flops: float | None = None
    status: str = "unknown"  # done / to compute / unknown (the plan could not look)

    def gpu_hours(self, flops_per_gpu_second: float) -> float | None:
        return None if self.flops is None else self.flops / flops_per_gpu_second / 3600


@dataclass
class Estimate:
    """The whole fusion's figures, row by row, and the assumptions behind them."""

    mfu: float
    peak_tflops: float
    models: list[ModelEstimate]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def flops_per_gpu_second(self) -> float:
        return self.mfu * self.peak_tflops * 1e12

    def total(self, attr: str, status: str | None = None) -> float | None:
        """Sum of `attr` ("bytes" or "flops") over the rows it applies to; None if one is unknown."""
        rows = [r for r in self.rows if status is None or r.status == status]
        values = [getattr(r, attr) for r in rows if r.stage in APPLIES[attr]]
        if any(v is None for v in values):
            return None
        return float(sum(values))

    def gpu_hours(self, status: str | None = None) -> float | None:
        flops = self.total("flops", status)
        return None if flops is None else flops / self.flops_per_gpu_second / 3600

    cpu: dict = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)  # `cluster_estimate`, when a cluster is given

    def as_dict(self) -> dict:
        rate = self.flops_per_gpu_second
        return {
            "mfu": self.mfu,
            "peak_tflops": self.peak_tflops,
            "models": [m.__dict__ for m in self.models],
            "rows": [{**r.__dict__, "gpu_hours": r.gpu_hours(rate)} for r in self.rows],
            "total": {
                "bytes": self.total("bytes"),
                "flops": self.total("flops"),
                "gpu_hours": self.gpu_hours(),
            },
            "to_compute": {
                "bytes": self.total("bytes", "to compute"),
                "flops": self.total("flops", "to compute"),
                "gpu_hours": self.gpu_hours("to compute"),
            },
            "cpu": self.cpu,
            **({"cluster": self.cluster} if self.cluster else {}),
            "notes": self.notes,
        }


def cpu_estimate(config: FusionConfig, target_tokens: float | None) -> dict:
    """CPU-hours of cutting pieces and of align-and-fuse, and their wall time on this machine.

    Both are linear in the corpus text and spread over one process per core (`pieces.workers`,
    `fusion.workers`, default the cores); the rates are `PIECES_BYTES_PER_CPU_S` and
    `FUSE_BYTES_PER_CPU_S`. Text bytes: the local corpus's size, else tokens at
    `BYTES_PER_TOKEN_GUESS`.
    """
    text = local_corpus_bytes(config)
    source = "local corpus size"
    if text is None and target_tokens is not None:
        text, source = target_tokens * BYTES_PER_TOKEN_GUESS, "target tokens x 4 bytes"
    if text is None:
        return {}
    from fusellm.stages.base import cores

    available = cores()
    pieces_cores = config.pieces.workers or available
    fuse_cores = config.fusion.workers or available
    pieces = text / PIECES_BYTES_PER_CPU_S
    fuse = text / FUSE_BYTES_PER_CPU_S
    return {
        "text_bytes": text,
        "text_bytes_from": source,
        "pieces_cpu_hours": pieces / 3600,
        "align_fuse_cpu_hours": fuse / 3600,
        "workers": {"pieces": pieces_cores, "align_fuse": fuse_cores},
        "wall_hours": (pieces / pieces_cores + fuse / fuse_cores) / 3600,
    }


def _status(report, *patterns: str) -> str:
    """done / to compute from the plan's units whose labels match one of `patterns` fully."""
    if report is None or not report.units:
        return "unknown"
    units = [u for u in report.units if any(re.fullmatch(p, u.label) for p in patterns)]
    if not units:
        return "unknown"
    return "to compute" if any(not u.done for u in units) else "done"


def _done_info(report, label: str) -> dict:
    unit = report.find(label) if report is not None else None
    return unit.artifact.info if unit is not None and unit.done else {}


def estimate(config: FusionConfig, report=None, *, mfu: float = 0.4, peak_tflops: float = 989.0):
    """Figures for the whole fusion; `report` (a `PlanReport`) adds what is done and counted."""
    identities = report.identities if report is not None else {}
    models = []
    for model in distinct_models(config):
        key = "target" if "target" in model.roles else f"source:{model.name}"
        models.append(describe_model(model, config, identities.get(key)))
    notes = _count_tokens(models, config, report)
    rows = _extraction_rows(models, config, report)
    target = next(m for m in models if "target" in m.roles)
    per_token = store_bytes_per_token(config.extraction.top_k, False)
    runs = []
    for label, (store, model, data, shards) in _fusions(config, models).items():
        fused_tokens = _done_info(report, data).get("tokens") or target.tokens
        fused_bytes = None if fused_tokens is None else fused_tokens * per_token
        fusion = _status(report, shards, data, r"vocab-map-.+")
        rows.append(Row("fuse", store, fused_tokens, fused_bytes, None, fusion))
        runs.append((label, model, fused_tokens))
    if config.evaluation.baseline:  # the same pieces as the fusions
        runs.append(("baseline", "CLM baseline (lam 1)", runs[0][2]))
    for label, what, tokens in runs:
        train_tokens, how = training_tokens(config, tokens, report)
        notes += [how] if how and how not in notes else []
        known = train_tokens is not None and target.parameters is not None
        flops = 6 * target.parameters * train_tokens if known else None
        rows.append(
            Row("train", what, train_tokens, None, flops, _status(report, f"train-{label}"))
        )
    notes.append("evaluation is not estimated: it depends on the suites' sizes and generation")
    cpu = cpu_estimate(config, target.tokens)
    return Estimate(mfu, peak_tflops, models, rows, notes, cpu)


def _fusions(config: FusionConfig, models: list[ModelEstimate]) -> dict[str, tuple[str, ...]]:
    """Training label -> (the fused store's row, the trained model's row, the fused data's unit
    label, its shards' label pattern): one for joint fusion, one per pair for pairwise."""
    lam = f"lam {config.training.lam:g}"
    if config.fusion.mode == "joint":
        return {
            "fused": ("fused store (target vocabulary)", f"fused model ({lam})", "fused-data",
                      r"fuse-shard-\w+")
        }  # fmt: skip
    return {
        f"pair-{m.name}": (f"fused store, pair {m.name}", f"pairwise model {m.name} ({lam})",
                           f"fused-data-pair-{m.name}", rf"fuse-pair-{re.escape(m.name)}-shard-\w+")
        for m in models if "target" not in m.roles
    }  # fmt: skip


def _count_tokens(models: list[ModelEstimate], config: FusionConfig, report) -> list[str]:
    """Each model's tokens from the best source there is; notes on what is missing."""
    counts = {m.name: _done_info(report, f"store-{m.name}").get("tokens") for m in models}
    counted = next(((name, n) for name, n in counts.items() if n), None)
    corpus_bytes = local_corpus_bytes(config)
    notes = []
    for m in models:
        if counts[m.name]:
            m.tokens, m.tokens_from = float(counts[m.name]), "extraction store"
        elif counted:  # the same texts in another tokenizer: closer than any guess
            m.tokens, m.tokens_from = float(counted[1]), f"{counted[0]}'s extraction store"
        elif config.planning.corpus_tokens:
            m.tokens, m.tokens_from = config.planning.corpus_tokens, "planning.corpus_tokens"
        elif corpus_bytes:
            m.tokens = corpus_bytes / BYTES_PER_TOKEN_GUESS
            m.tokens_from = f"corpus size / {BYTES_PER_TOKEN_GUESS:g} bytes per token"
        if m.parameters is None:
            name = config.target.display_name if m.name == "target" else m.name
            hint = f"planning.parameters.{name}"
            notes.append(
                f"parameters of {m.name} unknown: its config.json is not on this machine; set "
                f"{hint} (or --set {hint}=7e9)"
            )
    if any(m.tokens is None for m in models):
        notes.append(
            "corpus tokens unknown: set planning.corpus_tokens (or --set "
            "planning.corpus_tokens=1.8e9)"
        )
    return notes


def _extraction_rows(models: list[ModelEstimate], config: FusionConfig, report) -> list[Row]:
    e = config.extraction
    rows = []
    for m in models:
        tokens, n = m.tokens, m.parameters
        per_token = store_bytes_per_token(e.top_k, e.token_ce)
        name = re.escape(m.name)
        rows.append(
            Row(
                "extract",
                f"{m.name} ({', '.join(m.roles)})",
                tokens,
                None if tokens is None else tokens * per_token,
                None if tokens is None or n is None else 2 * n * tokens,
                _status(report, rf"extract-{name}-shard-\w+", f"store-{name}"),
            )
        )
    return rows


def training_tokens(config: FusionConfig, tokens: float | None, report=None):
    """Tokens one training run reads, and a note on how `max_steps` bounds them (or None)."""
    t = config.training
    if tokens is None:
        return None, None
    full = tokens * t.epochs
    if t.max_steps is None:
        return full, None
    pieces = _done_info(report, "pieces").get("pieces")
    if pieces:
        share = min(t.epochs, t.max_steps * t.global_batch / pieces)
        return tokens * share, f"training.max_steps={t.max_steps}: {share:.3g} epochs"
    bound = t.max_steps * t.global_batch * (config.pieces.block_size - config.pieces.margin)
    return min(full, bound), (
        f"training.max_steps={t.max_steps}: at most {bound:.3g} tokens per run "
        "(full pieces); fewer if pieces are shorter"
    )


# ---------------------------------------------------------------------------------------------
# On a cluster

INTER_NODE_EFFICIENCY = 0.9
"""Share of linear speed-up kept each time a data-parallel training run doubles its nodes.

An assumption, not a measurement: nothing in this repository has timed training across nodes.
Inside a node (NVLink) the GPUs are taken to scale linearly; each doubling of the nodes keeps
0.9 of the speed (gradient all-reduce over the network): 1 node 1.0, 2 nodes 0.9, 4 nodes 0.81,
8 nodes 0.73. Change it here to plan with a measured figure.
"""
# Bytes per parameter of the trained model (the module's dtype) and of one DeepSpeed checkpoint
# (the module's weights, plus fp32 master weights, Adam's two moments with bf16: 2 + 4 + 4 + 4;
# without bf16 the weights are the master copy: 4 + 4 + 4). ZeRO partitions the optimizer
# state across ranks but saves all of it, so the total does not depend on the GPUs.
MODEL_BYTES_PER_PARAMETER = {True: 2, False: 4}
CHECKPOINT_BYTES_PER_PARAMETER = {True: 14, False: 12}


def schedule_hours(units: list[float], gpus: int) -> tuple[float, int]:
    """Wall-clock hours of independent units on `gpus` GPUs, and the most units one GPU runs.

    Each GPU runs one unit at a time; the units, longest first, each go to the GPU that is free
    first (list scheduling, longest processing time first). The result is at least the units'
    GPU-hours / `gpus` and at least the longest unit; n equal units take ceil(n / gpus) of them
    one after the other (4 units of 1 GPU-hour on 2 GPUs: 2 hours).
    """
    import heapq

    if gpus < 1:
        raise ValueError(f"gpus: {gpus}; at least 1")
    free = [(0.0, 0, gpu) for gpu in range(min(gpus, len(units)))]  # (hours, units, gpu)
    for hours in sorted(units, reverse=True):
        load, count, gpu = heapq.heappop(free)
        heapq.heappush(free, (load + hours, count + 1, gpu))
    return max((f[0] for f in free), default=0.0), max((f[1] for f in free), default=0)


def training_efficiency(nodes: int) -> float:
    """Assumed data-parallel scaling efficiency on `nodes` nodes (`INTER_NODE_EFFICIENCY`)."""
    return INTER_NODE_EFFICIENCY ** math.log2(nodes)


def extraction_shards(config: FusionConfig, report, target_tokens: float | None):
    """Pieces shards each model is extracted over, and where the count came from (or None).

    The finished pieces stage's count, else full pieces: target tokens / (block_size -
    margin) pieces in shards of `extraction.shard_size`. Documents shorter than a block make
    more, shorter pieces, so the guess gives fewer, longer units: a wall-clock on the high side.
    """
    shards = _done_info(report, "pieces").get("shards")
    if shards:
        return int(shards), "pieces stage"
    if target_tokens is None:
        return None, "unknown"
    per_piece = config.pieces.block_size - config.pieces.margin
    pieces = math.ceil(target_tokens / per_piece)
    return math.ceil(pieces / config.extraction.shard_size), (
        f"{pieces:,} full pieces of {per_piece} tokens"
    )


def extraction_part_shards(config: FusionConfig) -> int:
    """Shards in one extraction part, the (model, group of shards) that one GPU worker extracts
    with `execution: deployments` (`extraction.shards_per_part`; one shard a part where the
    config has no such field)."""
    return int(getattr(config.extraction, "shards_per_part", 1))


def part_sizes(shards: int, group: int) -> list[int]:
    """Shards of each part of one model: `group` each, the rest in the last (5, 2: [2, 2, 1])."""
    return [min(group, shards - start) for start in range(0, shards, group)]


def _sum(values):
    return None if any(v is None for v in values) else float(sum(values))


def cluster_estimate(
    config: FusionConfig, figures: Estimate, report=None, *, nodes: int, gpus_per_node: int
) -> dict:
    """Wall-clock hours of each stage on `nodes` nodes of `gpus_per_node` GPUs, and the bytes
    the shared work folder must hold (docs/planning.md, "On a cluster").

    - pieces and align-and-fuse are CPU stages: their wall-clock is `cpu_estimate`'s, on
      `pieces.workers` and `fusion.workers` processes, whatever the GPUs;
    - extraction: one unit per model x pieces shard (the model's GPU-hours shared equally among
      its shards), spread over all the GPUs (`schedule_hours`);
    - training: each run on all the GPUs, data parallel, at `training_efficiency(nodes)`; the
      fused model, then the CLM baseline, one after the other as `pipeline.train` runs them;
    - evaluation: one unit per model x suite, one GPU each; not estimated (nor its GPU-hours).
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"a cluster of {nodes} nodes x {gpus_per_node} GPUs; at least 1 x 1")
    gpus = nodes * gpus_per_node
    rate = figures.flops_per_gpu_second
    target = next(m for m in figures.models if "target" in m.roles)
    stages, notes = [], []

    cpu = figures.cpu
    if cpu:
        pieces_wall = cpu["pieces_cpu_hours"] / cpu["workers"]["pieces"]
        fuse_wall = cpu["align_fuse_cpu_hours"] / cpu["workers"]["align_fuse"]
    else:
        pieces_wall = fuse_wall = None
    how = "CPU stage, unchanged by GPUs: {} CPU-h on {} workers ({}.workers)"
    pieces_how = how.format(*_cpu_how(cpu, "pieces_cpu_hours", "pieces"), "pieces")
    stages.append(_stage("prepare", "pieces", None, None, pieces_wall, pieces_how))

    rows = [r for r in figures.rows if r.stage == "extract"]
    shards, shards_from = extraction_shards(config, report, target.tokens)
    model_hours = [r.gpu_hours(rate) for r in rows]
    group = extraction_part_shards(config)
    wall = per_gpu = count = None
    if shards and all(h is not None for h in model_hours):
        units = [h * n / shards for h in model_hours for n in part_sizes(shards, group)]
        wall, per_gpu = schedule_hours(units, gpus)
        count = len(units)
    extract_how = (
        f"{shards} shards a model ({shards_from}) in parts of {group}: {len(rows)} x "
        f"{count // len(rows)} parts, up to {per_gpu} on one GPU"
        if wall is not None
        else "shards or GPU-hours unknown"
    )
    stages.append(
        _stage("extract", "top-k stores, in parts", count, _sum(model_hours), wall, extract_how)
    )

    fuse_how = how.format(*_cpu_how(cpu, "align_fuse_cpu_hours", "align_fuse"), "fusion")
    stages.append(_stage("fuse", "align-and-fuse", None, None, fuse_wall, fuse_how))

    efficiency = training_efficiency(nodes)
    for n, r in enumerate(r for r in figures.rows if r.stage == "train"):
        hours = r.gpu_hours(rate)
        wall = None if hours is None else hours / (gpus * efficiency)
        run_how = (
            f"data parallel on {_gpus(gpus)} at {efficiency:.0%} efficiency (assumed: "
            f"{INTER_NODE_EFFICIENCY:g} per doubling of nodes)"
        )
        run_how += ", after the fused model" if n else ""
        stages.append(_stage("train", r.what, 1, hours, wall, run_how))
    spans = getattr(config.training, "nodes", None)  # machines one training run spans
    if spans is None and nodes > 1:
        notes.append(
            f"training on {nodes} nodes: the train stage runs DeepSpeed over the GPUs of the "
            "machine it runs on; start it under the DeepSpeed launcher with a hostfile of the "
            'nodes (README, "Stages on their own")'
        )
    elif spans is not None and spans != nodes:
        notes.append(
            f"training.nodes is {spans}: a training run spans {spans} node"
            f"{'s' * (spans != 1)}, not the {nodes} planned here; set training.nodes: {nodes} "
            "(and training.rendezvous) for the training figures above"
        )
    t = config.training
    if t.global_batch % (t.micro_batch * gpus):
        notes.append(
            f"training.global_batch {t.global_batch} is not a multiple of training.micro_batch "
            f"{t.micro_batch} x {_gpus(gpus)}: training stops with an error on this cluster; "
            "change one of them"
        )

    e = config.evaluation
    evaluated = 1 + int(e.baseline) + (len(config.sources) if e.sources else 0)
    count = evaluated * len(e.suites)
    rounds = math.ceil(count / gpus) if count else 0
    stages.append(
        _stage(
            "evaluate",
            f"{evaluated} models x {len(e.suites)} suites",
            count,
            None,
            None,
            f"not estimated; one GPU each, {rounds} round{'s' * (rounds != 1)} on {_gpus(gpus)}",
        )
    )

    if config.execution != "deployments":
        notes.append(
            f"execution is {config.execution}: `fusellm run` then uses the GPUs of its own "
            "machine only; these figures assume execution: deployments, whose extraction and "
            "evaluation parts go to every GPU worker"
        )
    total = _sum([s["wall_hours"] for s in stages if s["stage"] != "evaluate"])
    return {
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "gpus": gpus,
        "training_efficiency": efficiency,
        "stages": stages,
        "wall_hours": total,
        "wall_hours_without": ["evaluate"],
        "shared_folder": shared_folder(config, figures),
        "notes": notes,
    }


def _gpus(count: int) -> str:
    return f"{count} GPU{'s' * (count != 1)}"


def _cpu_how(cpu: dict, hours: str, workers: str) -> tuple[str, str]:
    if not cpu:
        return "?", "?"
    value = cpu[hours]
    return (f"{value:.1f}" if value >= 0.1 else f"{value:.1e}"), str(cpu["workers"][workers])


def _stage(stage, what, units, gpu_hours, wall_hours, how) -> dict:
    return {
        "stage": stage,
        "what": what,
        "units": units,
        "gpu_hours": gpu_hours,
        "wall_hours": wall_hours,
        "how": how,
    }


def shared_folder(config: FusionConfig, figures: Estimate) -> dict:
    """What the work folder shared by the nodes holds at its fullest: every top-k store, the
    fused store, the pieces (about the corpus's text), the trained models and, while a run
    trains, `training.keep_checkpoints` + 1 checkpoints (a new one is written before the oldest
    is pruned; they are removed when the run ends, and the runs train one after the other).
    Models' own files are not counted: hf:// models sit in each node's Hugging Face cache."""
    t = config.training
    bf16 = t.bf16 is not False  # auto: on, on GPUs that have it
    n = next(m for m in figures.models if "target" in m.roles).parameters
    runs = sum(1 for r in figures.rows if r.stage == "train")
    stores = _sum([r.bytes for r in figures.rows if r.stage == "extract"])
    fused = _sum([r.bytes for r in figures.rows if r.stage == "fuse"])
    kept = t.keep_checkpoints + 1
    parts = [
        {"what": "top-k stores", "bytes": stores},
        {"what": "fused store", "bytes": fused},
        {"what": "pieces", "bytes": figures.cpu.get("text_bytes")},
        {
            "what": f"{runs} trained models",
            "bytes": None if n is None else runs * n * MODEL_BYTES_PER_PARAMETER[bf16],
        },
        {
            "what": f"{kept} checkpoints",
            "bytes": None if n is None else kept * n * CHECKPOINT_BYTES_PER_PARAMETER[bf16],
        },
    ]
    return {"bytes": _sum([p["bytes"] for p in parts]), "parts": parts}
