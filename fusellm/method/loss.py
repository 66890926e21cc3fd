"""The FuseLLM objective, computed sparsely (docs/design.md §2.6).

    L = lam * CLM + (1 - lam) * L_fuse,   L_fuse = -sum_v P_fused(v) log Q(v)

P_fused is known only on k ids per position (the fused top-k, renormalised with a softmax at
temperature tau). Both terms need the student's log-partition function log Z = logsumexp(logits)
and the student's logits at a few ids, so the whole loss is

    per position:  c * log Z - lam * z[label] - (1 - lam) * sum_j q_j z[id_j]

with c = 1 (sum_j q_j = 1) where the fused row has a usable entry, and c = lam, q = 0 where it
has none (every slot empty or -inf): such a row has no teacher, so it adds no fusion term, as
the dense formula's all-zero target row would (scoring it log Z would push the student towards
the uniform distribution). The gradient w.r.t. the logits is
c * softmax(z) - lam * onehot(label) - (1 - lam) * scatter(q).
We compute both with an explicit autograd Function, a chunk of rows at a time: peak memory is
the logits' gradient plus one float32 (float64 for float64 logits) chunk, never a dense [B, L, V] target (the published
collator builds one per source, ~130 MB per sample at V = 32k).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
_CHUNK_ROWS = 256  # rows per float32 chunk: bounds the temporary memory


def _soft_targets(topk_ids, topk_logprobs, temperature):
    """Renormalise the kept top-k values; empty slots (id < 0 or -inf) get weight 0.

    Returns (q, ids, has): `has` marks rows with at least one usable slot; other rows get q = 0.
    """
    dtype = torch.promote_types(topk_logprobs.dtype, torch.float32)
    valid = (topk_ids >= 0) & torch.isfinite(topk_logprobs)
    has = valid.any(dim=-1)
    scaled = torch.where(valid, topk_logprobs.to(dtype) / temperature, float("-inf"))
    scaled = torch.where(has[:, None], scaled, 0.0)  # keep the softmax finite on empty rows
    q = torch.where(valid, torch.softmax(scaled, dim=-1), 0.0)
    return q, topk_ids.clamp(min=0), has


class _SparseFusionCE(torch.autograd.Function):
    """Sum over kept rows of  lam * CLM + (1 - lam) * fuse, scaled; also the two sums, for logs.

    `logits` is the flat [N, V] view of the model output (no copy); `rows` selects the positions
    that have a next label. Work happens a chunk of rows at a time, in float32.
    """

    @staticmethod
    def forward(ctx, logits, rows, labels, ids, q, has, lam, scale):
        acc = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays
        clm_sum = logits.new_zeros((), dtype=acc)
        fuse_sum = logits.new_zeros((), dtype=acc)
        for start in range(0, rows.numel(), _CHUNK_ROWS):
            part = slice(start, start + _CHUNK_ROWS)
            z = logits.index_select(0, rows[part]).to(acc)
            log_z = torch.logsumexp(z, dim=-1)
            clm_sum += (log_z - z.gather(-1, labels[part, None]).squeeze(-1)).sum()
            if ids is not None:
                fused = log_z - (q[part].to(acc) * z.gather(-1, ids[part])).sum(-1)
                fuse_sum += torch.where(has[part], fused, 0.0).sum()
        ctx.save_for_backward(logits, rows, labels, ids, q, has)
        ctx.lam, ctx.scale = lam, scale
        ctx.mark_non_differentiable(clm_sum, fuse_sum)
        total = (lam * clm_sum + (1.0 - lam) * fuse_sum) * scale
        return total, clm_sum * scale, fuse_sum * scale

    @staticmethod
    def backward(ctx, grad_total, _grad_clm, _grad_fuse):
        logits, rows, labels, ids, q, has = ctx.saved_tensors
        lam, coef = ctx.lam, ctx.scale * grad_total
        grad = torch.zeros_like(logits)
        for start in range(0, rows.numel(), _CHUNK_ROWS):
            part = slice(start, start + _CHUNK_ROWS)
            acc = torch.promote_types(logits.dtype, torch.float32)
            g = torch.softmax(logits.index_select(0, rows[part]).to(acc), dim=-1)
            if ids is not None:  # softmax weight c: 1 with a fusion term, lam without
                g = torch.where(has[part, None], g, g * lam)
            g.scatter_add_(-1, labels[part, None], g.new_full((g.shape[0], 1), -lam))
            if ids is not None:
                g.scatter_add_(-1, ids[part], -(1.0 - lam) * q[part].to(g.dtype))
            grad.index_copy_(0, rows[part], (g * coef).to(grad.dtype))
        return grad, None, None, None, None, None, None, None


def _check_shapes(logits, labels, topk_ids, topk_logprobs):
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, length, vocab], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape[:2])}"
        )
    if topk_ids is None:
        return
    if topk_logprobs is None or topk_ids.shape != topk_logprobs.shape:
        raise ValueError("topk_ids and topk_logprobs must both be given with the same shape")
    if topk_ids.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"top-k shape {tuple(topk_ids.shape)} does not match logits {tuple(logits.shape[:2])}"
        )


def fusion_loss_parts(logits, labels, topk_ids=None, topk_logprobs=None, lam=0.9, temperature=1.0):
    """Return (total, clm, fuse) losses; `clm` and `fuse` are detached, for logging.

    Positions t count when labels[:, t + 1] != -100; logits[:, t] and the top-k at t describe the
    token after t. With lam == 1 the top-k may be None (the CLM baseline).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if lam < 1.0 and topk_ids is None:
        raise ValueError("topk_ids/topk_logprobs are required when lam < 1")
    _check_shapes(logits, labels, topk_ids, topk_logprobs)

    batch, length, vocab = logits.shape
    # Position t predicts labels[:, t + 1]; the last position predicts nothing.
    next_labels = torch.full_like(labels, IGNORE_INDEX)
    next_labels[:, :-1] = labels[:, 1:]
    rows = (next_labels != IGNORE_INDEX).reshape(-1).nonzero().squeeze(-1)
    if rows.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach(), zero.detach()

    targets = next_labels.reshape(-1).index_select(0, rows)
    if targets.min() < 0 or targets.max() >= vocab:
        raise ValueError(
            f"labels must be -100 or in [0, {vocab}); got {targets.min().item()}..{targets.max().item()}"
        )
    ids = q = has = None
    if topk_ids is not None and lam < 1.0:
        k = topk_ids.shape[-1]
        q, ids, has = _soft_targets(
            topk_ids.reshape(-1, k).index_select(0, rows),
            topk_logprobs.reshape(-1, k).index_select(0, rows),
            temperature,
        )
        if ids.max() >= vocab:
            raise ValueError(f"topk_ids must be < vocab size {vocab}; got {ids.max().item()}")
    flat = logits.reshape(batch * length, vocab)
    total, clm, fuse = _SparseFusionCE.apply(
        flat, rows, targets, ids, q, has, float(lam), 1.0 / rows.numel()
    )
    return total, clm, fuse


def fusion_loss(logits, labels, topk_ids=None, topk_logprobs=None, lam=0.9, temperature=1.0):
    """lam * CLM + (1 - lam) * CE(fused top-k, student), averaged over predicted positions."""
    return fusion_loss_parts(logits, labels, topk_ids, topk_logprobs, lam, temperature)[0]
