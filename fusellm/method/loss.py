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

With `rest_bucket` the top-k is not renormalised: the stored values are the teacher's real
probabilities p_j (extraction keeps log-softmax values), and the mass it dropped becomes one
more category, "the rest of the vocabulary", so the fusion term is a (k + 1)-way cross-entropy:

    L_fuse = -sum_j p_j log Q(id_j) - p_rest log Q_rest,   p_rest = 1 - sum_j p_j,
    Q_rest = sum over v not among the ids of Q(v)

A weak teacher that keeps a third of its mass in its top 10 then asks the student for a third
there, not for all of it. Since sum_j p_j + p_rest = 1 the per-position loss becomes

    c * log Z - lam * z[label] - (1 - lam) * (sum_j q_j z[id_j] + q_rest log Z_rest)

with log Z_rest = logsumexp of the logits off the kept ids (log Q_rest = log Z_rest - log Z),
and the gradient gains -(1 - lam) * q_rest * softmax(z restricted to the rest). We take log Z_rest
from the logits with the kept ids masked out rather than as log(1 - sum_j Q(id_j)): the
subtraction loses every digit when the student's kept mass is within float32 rounding of 1,
the masked log-sum-exp never does, and repeated ids count once. The temperature must be 1 here:
a temperature reshapes a distribution, and the store does not hold the dropped tail's shape.

We compute everything with an explicit autograd Function, a chunk of rows at a time: peak memory
is the logits' gradient plus one float32 (float64 for float64 logits) chunk, never a dense
[B, L, V] target (the published collator builds one per source, ~130 MB per sample at V = 32k).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
_CHUNK_ROWS = 256  # rows per float32 chunk: bounds the temporary memory


def _soft_targets(topk_ids, topk_logprobs, temperature, rest_bucket=False):
    """Target weights of the kept ids; empty slots (id < 0 or -inf) get weight 0.

    Returns (q, ids, has, q_rest): `has` marks rows with at least one usable slot (other rows
    get q = 0). Without the rest bucket q is the softmax of the values at `temperature` and
    q_rest is None; with it q is the stored probabilities and q_rest = 1 - sum q (a row whose
    8-bit codes add up to a little over 1 is scaled back to 1, with q_rest = 0).
    Empty slots point at a usable id of their row (weight 0), so masking the kept ids for the
    rest bucket never masks an id that was not kept.
    """
    dtype = torch.promote_types(topk_logprobs.dtype, torch.float32)
    valid = (topk_ids >= 0) & torch.isfinite(topk_logprobs)
    has = valid.any(dim=-1)
    first = topk_ids.gather(-1, valid.to(torch.int8).argmax(-1, keepdim=True)).clamp(min=0)
    ids = torch.where(valid, topk_ids, first)
    if rest_bucket:
        p = torch.where(valid, topk_logprobs.to(dtype).exp(), 0.0)
        kept = p.sum(-1)
        rest = torch.where(has, (1.0 - kept).clamp(min=0.0), 0.0)
        return p / kept.clamp(min=1.0)[:, None], ids, has, rest
    scaled = torch.where(valid, topk_logprobs.to(dtype) / temperature, float("-inf"))
    scaled = torch.where(has[:, None], scaled, 0.0)  # keep the softmax finite on empty rows
    q = torch.where(valid, torch.softmax(scaled, dim=-1), 0.0)
    return q, ids, has, None


def _off_kept(z, ids):
    """The logits with the kept ids masked out: the rest bucket's share of the vocabulary."""
    return z.scatter(-1, ids, float("-inf"))


class _SparseFusionCE(torch.autograd.Function):
    """Sum over kept rows of  lam * CLM + (1 - lam) * fuse, scaled; also the two sums, for logs.

    `logits` is the flat [N, V] view of the model output (no copy); `rows` selects the positions
    that have a next label; `q_rest` (or None) is the rest bucket's target weight per row.
    Work happens a chunk of rows at a time, in float32.
    """

    @staticmethod
    def forward(ctx, logits, rows, labels, ids, q, has, q_rest, lam, scale):
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
                if q_rest is not None:  # - q_rest * log Z_rest; no rest mass, no term
                    w = q_rest[part].to(acc)
                    log_rest = torch.logsumexp(_off_kept(z, ids[part]), dim=-1)
                    fused = fused - torch.where(w > 0, w * log_rest, 0.0)
                fuse_sum += torch.where(has[part], fused, 0.0).sum()
        ctx.save_for_backward(logits, rows, labels, ids, q, has, q_rest)
        ctx.lam, ctx.scale = lam, scale
        ctx.mark_non_differentiable(clm_sum, fuse_sum)
        total = (lam * clm_sum + (1.0 - lam) * fuse_sum) * scale
        return total, clm_sum * scale, fuse_sum * scale

    @staticmethod
    def backward(ctx, grad_total, _grad_clm, _grad_fuse):
        logits, rows, labels, ids, q, has, q_rest = ctx.saved_tensors
        lam, coef = ctx.lam, ctx.scale * grad_total
        grad = torch.zeros_like(logits)
        acc = torch.promote_types(logits.dtype, torch.float32)
        for start in range(0, rows.numel(), _CHUNK_ROWS):
            part = slice(start, start + _CHUNK_ROWS)
            z = logits.index_select(0, rows[part]).to(acc)
            g = torch.softmax(z, dim=-1)
            if ids is not None:  # softmax weight c: 1 with a fusion term, lam without
                g = torch.where(has[part, None], g, g * lam)
            g.scatter_add_(-1, labels[part, None], g.new_full((g.shape[0], 1), -lam))
            if ids is not None:
                g.scatter_add_(-1, ids[part], -(1.0 - lam) * q[part].to(g.dtype))
            if q_rest is not None:
                rest = torch.softmax(_off_kept(z, ids[part]), dim=-1)
                g -= (1.0 - lam) * q_rest[part, None].to(g.dtype) * rest
            grad.index_copy_(0, rows[part], (g * coef).to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None


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


def fusion_loss_parts(
    logits,
    labels,
    topk_ids=None,
    topk_logprobs=None,
    lam=0.9,
    temperature=1.0,
    *,
    rest_bucket=False,
):
    """Return (total, clm, fuse) losses; `clm` and `fuse` are detached, for logging.

    Positions t count when labels[:, t + 1] != -100; logits[:, t] and the top-k at t describe the
    token after t. With lam == 1 the top-k may be None (the CLM baseline). `rest_bucket` keeps
    the mass the top-k dropped as one more category instead of renormalising (module docstring).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if rest_bucket and temperature != 1.0:
        raise ValueError(
            f"rest_bucket needs temperature 1, got {temperature}: the stored values are the "
            "teacher's probabilities, and a temperature would also reshape the dropped tail, "
            "which the store does not hold"
        )
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
    ids = q = has = q_rest = None
    if topk_ids is not None and lam < 1.0:
        k = topk_ids.shape[-1]
        if rest_bucket and k >= vocab:
            raise ValueError(f"rest_bucket needs top-k ({k}) below the vocabulary size {vocab}")
        q, ids, has, q_rest = _soft_targets(
            topk_ids.reshape(-1, k).index_select(0, rows),
            topk_logprobs.reshape(-1, k).index_select(0, rows),
            temperature,
            rest_bucket,
        )
        if ids.max() >= vocab:
            raise ValueError(f"topk_ids must be < vocab size {vocab}; got {ids.max().item()}")
    flat = logits.reshape(batch * length, vocab)
    total, clm, fuse = _SparseFusionCE.apply(
        flat, rows, targets, ids, q, has, q_rest, float(lam), 1.0 / rows.numel()
    )
    return total, clm, fuse


# The same parameters as `fusion_loss_parts`, on purpose: this is its total alone.
def fusion_loss(
    logits,
    labels,
    topk_ids=None,
    topk_logprobs=None,
    lam=0.9,
    temperature=1.0,
    *,
    rest_bucket=False,
):
    """lam * CLM + (1 - lam) * CE(fused top-k, student), averaged over predicted positions."""
    return fusion_loss_parts(
        logits, labels, topk_ids, topk_logprobs, lam, temperature, rest_bucket=rest_bucket
    )[0]
