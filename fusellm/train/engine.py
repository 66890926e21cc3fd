"""The training loop: DeepSpeed engine, sparse fusion loss, exact resume.

Why `deepspeed.initialize` with our own loop and not the HF Trainer: the step is three lines
(forward, `fusion_loss_parts`, backward) and stays in plain view, the sparse top-k tensors need
no Trainer plumbing (label names, column removal, `compute_loss` overrides), and exact resume
reduces to what we can see: DeepSpeed's checkpoint (module, optimizer partitions, scheduler),
each rank's RNG, and the step, from which the data order follows (`DataOrder`).

One process: call `train(...)`; it sets the single-process launcher variables itself. Several
processes, GPUs or nodes: start `python -m fusellm.train` under `deepspeed` or `torchrun`.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fusellm.method.loss import fusion_loss_parts
from fusellm.train.card import model_card
from fusellm.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from fusellm.train.collator import collate
from fusellm.train.config import TrainConfig, TrainConfigError, as_config
from fusellm.train.data import DataOrder, open_training_data
from fusellm.train.progress import StepLogger, StepMetrics

# Fields a resumed run may change: they do not alter the trajectory of the weights.
_RESUMABLE_CHANGES = {
    "checkpoint_every",
    "keep_checkpoints",
    "gradient_checkpointing",
    # where the ranks run: the world size, checked on its own, is what a checkpoint fixes
    "nodes",
    "rendezvous",
    "rendezvous_timeout",
}


def check_resume(checkpoint: Path, config: TrainConfig, world_size: int) -> int:
    """The step to resume from; refuses a checkpoint that cannot continue exactly."""
    state = read_state(checkpoint)
    if state["world_size"] != world_size:
        raise TrainConfigError(
            f"{checkpoint}: written by {state['world_size']} ranks, this run has {world_size}; "
            "resume with the same number of processes or start a new output folder"
        )
    now = config.model_dump(mode="json")
    changed = sorted(
        k for k in now if k not in _RESUMABLE_CHANGES and state["config"].get(k) != now[k]
    )
    if changed:
        detail = ", ".join(f"{k}: {state['config'].get(k)!r} -> {now[k]!r}" for k in changed)
        raise TrainConfigError(
            f"{checkpoint}: the config changed since this checkpoint ({detail}); "
            "restore those fields, or train into a new output folder (or with resume off)"
        )
    return int(state["step"])


@dataclass
class TrainResult:
    model_dir: Path | None  # None on ranks other than 0
    steps: int
    resumed_from: int  # step of the checkpoint the run started from (0 = fresh)
    losses: list[float] = field(default_factory=list)  # total loss of each step run here
    tokens: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the launcher's process group, or make a one-process group when started bare."""
    import deepspeed

    if "RANK" not in os.environ:  # no launcher: a single process (else DeepSpeed tries MPI)
        # set even when a group exists already (an earlier in-process run): DeepSpeed reads them
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not dist.is_initialized():
            # One process needs no rendezvous: an in-memory store cannot lose a race for a
            # port to another program, as a TCP one can on a busy machine.
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not dist.is_initialized():
        deepspeed.init_distributed()


def use_bf16(config: TrainConfig) -> bool:
    if config.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(config.bf16)


def deepspeed_config(config: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config the training fields imply, with `config.deepspeed` merged on top."""
    accumulation = config.global_batch // (config.micro_batch * world_size)
    ds = {
        "train_batch_size": config.global_batch,
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": use_bf16(config)},
        "steps_per_print": 10**9,  # the progress bar and MLflow report instead
        "wall_clock_breakdown": False,
    }
    if config.optimizer == "deepspeed":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": config.learning_rate,
                "betas": list(config.adam_betas),
                "eps": config.adam_eps,
                "weight_decay": config.weight_decay,
                # CPU has no fused Adam kernel: DeepSpeed then wraps torch.optim.AdamW.
                "torch_adam": not torch.cuda.is_available(),
            },
        }
    return _merge(ds, config.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _enable_checkpointing(model) -> None:
    """Recompute activations in backward; non-reentrant, so results match a run without it."""
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases and norm scales (1-D) are left alone, as the HF Trainer does."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_engine(config: TrainConfig, model, total_steps: int, world_size: int):
    """Wrap `model` in a DeepSpeed engine with AdamW and the warmup + decay schedule."""
    import deepspeed
    from transformers import get_scheduler

    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    model.train()
    groups = _param_groups(model, config.weight_decay)
    optimizer = None
    if config.optimizer == "torch":
        optimizer = torch.optim.AdamW(
            groups,
            lr=config.learning_rate,
            betas=config.adam_betas,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )

    def schedule(opt):
        warmup = round(config.warmup_ratio * total_steps)
        return get_scheduler(config.lr_scheduler, opt, warmup, total_steps)

    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=None if optimizer is not None else groups,
        lr_scheduler=schedule,
        config=deepspeed_config(config, world_size),
    )
    return engine


def _plain_grad_norm(engine) -> float | None:
    """ZeRO-0 keeps whole gradients on the parameters and DeepSpeed reports no norm: take it."""
    if engine.zero_optimization_stage() != 0 or not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def micro_step(engine, batch: dict, config: TrainConfig):
    """Forward, sparse loss, backward and (at an accumulation boundary) the optimizer step.

    Returns (total, clm, fuse) losses, detached, and the gradient norm before clipping where
    it is known at this point (ZeRO-0 at a boundary; else None, and DeepSpeed has it).
    """
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, clm, fuse = fusion_loss_parts(
        logits,
        batch["labels"],
        batch.get("topk_ids"),
        batch.get("topk_logprobs"),
        lam=config.lam,
        temperature=config.temperature,
        rest_bucket=config.rest_bucket,
    )
    engine.backward(total)
    norm = _plain_grad_norm(engine)
    engine.step()
    return total.detach(), clm, fuse, norm


def _load_target(model_or_dir, tokenizer, config: TrainConfig):
    """(model, tokenizer, name); a model folder is read with trust_remote_code only if opted in."""
    from transformers import AutoTokenizer

    if isinstance(model_or_dir, (str, Path)):
        path = Path(model_or_dir)
        if not (path / "config.json").is_file():
            raise TrainConfigError(f"{path}: no model here (config.json is missing)")
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=config.trust_remote_code
            )
        return path, tokenizer, str(path)
    if tokenizer is None:
        raise TrainConfigError("tokenizer: required when the target is given as a model object")
    return model_or_dir, tokenizer, getattr(model_or_dir, "name_or_path", "") or "in-memory model"


def _materialise(model_or_path, config: TrainConfig):
    from transformers import AutoModelForCausalLM

    if isinstance(model_or_path, Path):
        return AutoModelForCausalLM.from_pretrained(
            model_or_path,
            dtype=torch.float32,  # master weights in fp32; DeepSpeed casts for bf16 compute
            trust_remote_code=config.trust_remote_code,
            use_safetensors=True,
        )
    return model_or_path


def _model_vocab(model_or_path, config: TrainConfig) -> int:
    from transformers import AutoConfig

    if isinstance(model_or_path, Path):
        cfg = AutoConfig.from_pretrained(model_or_path, trust_remote_code=config.trust_remote_code)
    else:
        cfg = model_or_path.config
    return cfg.get_text_config().vocab_size


def _reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _save_output(engine, tokenizer, output: Path, card: str) -> Path | None:
    """Gather the weights (ZeRO-3 shards them) and save on rank 0, via a temporary folder."""
    import deepspeed

    model = engine.module
    rank = dist.get_rank()
    params = list(model.parameters()) if engine.zero_optimization_stage() == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if rank == 0:
            tmp, final = output / ".tmp-model", output / "model"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(card)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    dist.barrier()
    return output / "model" if rank == 0 else None


def train(
    config: TrainConfig | dict | str | Path,
    model_or_dir,
    data_dir,
    output_dir,
    *,
    tokenizer=None,
    resume: bool = True,
    on_step: Callable[[int, StepMetrics, Path | None], None] | None = None,
) -> TrainResult:
    """Continually train the target on the fused data; returns where the model was saved.

    `model_or_dir`: a model folder (safetensors) or a model object (then pass `tokenizer`;
    for ZeRO-3 with several processes build it after `init_distributed()`).
    Output: `<output_dir>/model` (weights, tokenizer, model card) and `<output_dir>/checkpoints`.
    With `resume`, a run restarts from the latest checkpoint in `output_dir` and ends with the
    weights an uninterrupted run would have. `on_step(step, metrics, checkpoint_or_None)` is
    called on every rank after each optimizer step (for callers that watch progress).
    """
    config = as_config(config)
    output = Path(output_dir)
    target, tokenizer, base_name = _load_target(model_or_dir, tokenizer, config)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # checks first, before any process group
    store = open_training_data(
        data_dir, config, tokenizer, model_vocab_size=_model_vocab(target, config), world_size=world
    )
    latest = latest_checkpoint(output / "checkpoints") if resume else None
    step = check_resume(latest, config, world) if latest is not None else 0
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    order = DataOrder.for_store(store, config, world)
    total_steps = order.total_steps(config.epochs, config.max_steps)

    torch.manual_seed(config.seed)
    model = _materialise(target, config)
    engine = build_engine(config, model, total_steps, world)
    ckpt_root = output / "checkpoints"
    if latest is not None:
        load_checkpoint(engine, latest)
    elif not resume and rank == 0:  # a fresh start: older checkpoints must not outrank ours
        shutil.rmtree(ckpt_root, ignore_errors=True)
    dist.barrier()
    resumed_from = step

    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    with_topk = config.lam < 1
    logger = StepLogger(total_steps, step, enabled=rank == 0)
    result = TrainResult(None, total_steps, resumed_from)
    while step < total_steps:
        started = time.perf_counter()
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, clm, fuse, tokens
        for micro in range(order.accumulation):
            records = [store[i] for i in order.indices(step, rank, micro)]
            batch = collate(
                records, pad_id=pad_id, max_length=config.max_length, with_topk=with_topk
            )
            total, clm, fuse, norm = micro_step(engine, batch, config)
            parts = (total, clm, fuse, batch["attention_mask"].sum())
            sums = [a + b.item() for a, b in zip(sums, parts)]
        step += 1
        loss, clm, fuse, tokens = _reduce(sums)
        passes = order.accumulation * world
        grad_norm = engine.get_global_grad_norm() if norm is None else norm
        metrics = StepMetrics(
            loss=loss / passes,
            clm_loss=clm / passes,
            fusion_loss=fuse / passes if with_topk else 0.0,
            learning_rate=engine.get_lr()[0],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            tokens_per_s=tokens / (time.perf_counter() - started),
        )
        result.losses.append(metrics.loss)
        result.tokens += int(tokens)
        logger.log(step, metrics)
        saved = None
        if step % config.checkpoint_every == 0 or step == total_steps:
            client = {"step": step, "world_size": world, "config": config.model_dump(mode="json")}
            saved = save_checkpoint(engine, ckpt_root, step, client, config.keep_checkpoints)
        if on_step is not None:
            on_step(step, metrics, saved)
    logger.close()

    card = model_card(
        base_model=base_name,
        data_meta=store.meta,
        data_dir=str(data_dir),
        config=config.model_dump(mode="json"),
        steps=total_steps,
    )
    result.model_dir = _save_output(engine, tokenizer, output, card)
    return result
