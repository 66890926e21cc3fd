import pytest
import torch

from fusellm.method.loss import fusion_loss, fusion_loss_parts


def dense_reference(logits, labels, ids, logprobs, lam, temperature):
    """The textbook formula with a dense [B, L, V] target (what we must equal, not build)."""
    logits, next_labels = logits[:, :-1], labels[:, 1:]
    keep = next_labels != -100
    logp = torch.log_softmax(logits, -1)
    clm = -logp.gather(-1, next_labels.clamp(min=0)[..., None]).squeeze(-1)[keep].mean()
    if ids is None:
        return clm
    valid = (ids[:, :-1] >= 0) & torch.isfinite(logprobs[:, :-1])
    q = torch.softmax(torch.where(valid, logprobs[:, :-1] / temperature, float("-inf")), -1)
    target = torch.zeros_like(logits).scatter_add(
        -1, ids[:, :-1].clamp(min=0), torch.where(valid, q, 0.0)
    )
    fuse = -(target * logp).sum(-1)[keep].mean()
    return lam * clm + (1 - lam) * fuse


def make_batch(B=3, L=9, V=40, k=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, dtype=dtype, generator=g) * 2
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 4] = -100
    labels[-1, -3:] = -100  # right padding
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B * L)]).view(B, L, k)
    ids[1, 2, 4:] = -1  # empty slots
    logprobs = torch.log_softmax(torch.randn(B, L, k, dtype=dtype, generator=g), -1)
    logprobs = torch.where(ids >= 0, logprobs, float("-inf"))
    return logits, labels, ids, logprobs


@pytest.mark.parametrize("lam,temperature", [(0.9, 1.0), (0.5, 2.0), (0.0, 0.7), (1.0, 1.0)])
def test_equals_dense_formula_value_and_gradient(lam, temperature):
    logits, labels, ids, logprobs = make_batch()
    logits.requires_grad_(True)
    ours = fusion_loss(logits, labels, ids, logprobs, lam=lam, temperature=temperature)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = dense_reference(logits, labels, ids, logprobs, lam, temperature)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert ours.dtype == torch.float64
    assert abs(ours.item() - ref.item()) < 1e-6
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lam,temperature", [(0.9, 1.0), (0.3, 1.5), (0.0, 1.0)])
def test_rows_with_no_usable_entry_add_no_fusion_term(lam, temperature):
    """An all-empty fused row has no teacher: the dense formula's target row is all zeros, so
    only the CLM term counts there (scoring it log Z would flatten the student)."""
    logits, labels, ids, logprobs = make_batch()
    ids[0, 1] = -1  # every slot empty
    logprobs[0, 1] = float("-inf")
    logprobs[2, 3] = float("-inf")  # ids present, every probability gone
    logprobs[1, 5, :] = float("-inf")
    logits.requires_grad_(True)
    ours = fusion_loss(logits, labels, ids, logprobs, lam=lam, temperature=temperature)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = dense_reference(logits, labels, ids, logprobs, lam, temperature)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.isfinite(ours) and abs(ours.item() - ref.item()) < 1e-9
    torch.testing.assert_close(g_ours, g_ref, atol=1e-9, rtol=0)
    # at such a row the gradient is lam * (softmax - onehot(label)): the CLM term alone
    p = torch.softmax(logits[0, 1].detach(), -1)
    clm = lam * (p - torch.nn.functional.one_hot(labels[0, 2], logits.shape[-1]))
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(g_ours[0, 1] * n, clm, atol=1e-12, rtol=0)


def test_no_teacher_anywhere_leaves_only_the_clm_term():
    logits, labels, ids, logprobs = make_batch()
    _, clm, _ = fusion_loss_parts(logits, labels, ids, logprobs, lam=0.9)
    empty = torch.full_like(logprobs, float("-inf"))
    total, clm_again, fuse = fusion_loss_parts(logits, labels, ids, empty, lam=0.9)
    assert fuse.item() == 0.0 and torch.isclose(clm_again, clm)
    assert torch.isclose(total, 0.9 * clm)


def test_gradcheck_sparse_function():
    logits, labels, ids, logprobs = make_batch(B=2, L=5, V=11, k=3)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: fusion_loss(x, labels, ids, logprobs, lam=0.7, temperature=1.3), (logits,)
    )


def test_parts_are_the_two_terms():
    logits, labels, ids, logprobs = make_batch()
    total, clm, fuse = fusion_loss_parts(logits, labels, ids, logprobs, lam=0.9)
    assert torch.isclose(total, 0.9 * clm + 0.1 * fuse)
    assert torch.isclose(clm, dense_reference(logits, labels, None, None, 1.0, 1.0))
    assert torch.isclose(fuse, dense_reference(logits, labels, ids, logprobs, 0.0, 1.0))


def test_clm_baseline_needs_no_topk_and_matches_cross_entropy():
    logits, labels, _, _ = make_batch()
    ours = fusion_loss(logits, labels, None, None, lam=1.0)
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert abs(ours.item() - ref.item()) < 1e-10


def test_chunked_rows_and_bf16():
    import fusellm.method.loss as loss_module

    logits, labels, ids, logprobs = make_batch(B=4, L=33, V=50, k=5, dtype=torch.float32)
    full = fusion_loss(logits, labels, ids, logprobs)
    old = loss_module._CHUNK_ROWS
    loss_module._CHUNK_ROWS = 7  # force many chunks
    try:
        chunked = fusion_loss(logits, labels, ids, logprobs)
    finally:
        loss_module._CHUNK_ROWS = old
    assert torch.isclose(full, chunked, atol=1e-5)
    half = logits.to(torch.bfloat16).requires_grad_(True)
    value = fusion_loss(half, labels, ids, logprobs)
    value.backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(value)
    assert abs(value.item() - full.item()) < 0.05


def test_all_ignored_gives_zero_with_gradient():
    logits, labels, ids, logprobs = make_batch()
    labels[:] = -100
    logits.requires_grad_(True)
    value = fusion_loss(logits, labels, ids, logprobs)
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lam": 1.5}, "lam"),
        ({"temperature": 0.0}, "temperature"),
        ({"topk_ids": None, "topk_logprobs": None}, "required"),
    ],
)
def test_bad_arguments(kwargs, match):
    logits, labels, ids, logprobs = make_batch()
    args = {"topk_ids": ids, "topk_logprobs": logprobs, **kwargs}
    with pytest.raises(ValueError, match=match):
        fusion_loss(logits, labels, **args)


def test_shape_mismatch_is_named():
    logits, labels, ids, logprobs = make_batch()
    with pytest.raises(ValueError, match="top-k shape"):
        fusion_loss(logits, labels, ids[:, :-1], logprobs[:, :-1])
    with pytest.raises(ValueError, match="labels shape"):
        fusion_loss(logits, labels[:, :-1], ids, logprobs)


# --- rest bucket: the dropped mass as a (k + 1)-th category --------------------------------


def dense_rest_reference(logits, labels, ids, logprobs, lam):
    """-sum_j p_j log Q(id_j) - p_rest log Q_rest, densely in float64.

    Q_rest is summed from the student's probabilities off the kept ids (no subtraction), p_rest
    is 1 - sum_j p_j; rows without a usable entry add no fusion term.
    """
    logits64, next_labels = logits[:, :-1].double(), labels[:, 1:]
    keep = next_labels != -100
    logp = torch.log_softmax(logits64, -1)
    clm = -logp.gather(-1, next_labels.clamp(min=0)[..., None]).squeeze(-1)[keep].mean()
    ids, lp = ids[:, :-1], logprobs[:, :-1].double()
    valid = (ids >= 0) & torch.isfinite(lp)
    p = torch.where(valid, lp.exp(), 0.0)
    target = torch.zeros_like(logp).scatter_add(-1, ids.clamp(min=0), p)
    kept = torch.zeros_like(logp).scatter_add(-1, ids.clamp(min=0), valid.double()) > 0
    q_rest = (1 - p.sum(-1)).clamp(min=0)
    log_q_rest = torch.log(torch.where(kept, 0.0, logp.exp()).sum(-1))
    fuse = -(target * logp).sum(-1) - torch.where(q_rest > 0, q_rest * log_q_rest, 0.0)
    fuse = torch.where(valid.any(-1), fuse, 0.0)
    return lam * clm + (1 - lam) * fuse[keep].mean()


def rest_batch(dtype=torch.float64):
    """Top-k rows that keep part of the mass, plus the edge rows the rest bucket must survive."""
    logits, labels, ids, _ = make_batch(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    B, L, k = ids.shape
    mass = torch.rand(B, L, 1, dtype=torch.float64, generator=g) * 0.9 + 0.05  # kept share
    logprobs = torch.log_softmax(torch.randn(B, L, k, dtype=torch.float64, generator=g), -1)
    logprobs = (logprobs + mass.log()).to(dtype)
    logprobs = torch.where(ids >= 0, logprobs, float("-inf"))
    ids[0, 1] = -1  # no usable entry
    logprobs[0, 1] = float("-inf")
    logprobs[2, 3] = float("-inf")  # ids present, every probability gone
    logprobs[1, 0] = torch.log_softmax(torch.randn(k, dtype=torch.float64, generator=g), -1).to(
        dtype
    )
    logprobs[1, 1] = logprobs[1, 0] + torch.log1p(torch.tensor(-1e-12, dtype=torch.float64)).to(
        dtype
    )
    logprobs[1, 3, 0] = 0.0  # one-hot (an unaligned position): nothing dropped
    logprobs[1, 3, 1:] = float("-inf")
    # the student puts all but ~e-40 of its mass on the kept ids of one row
    with torch.no_grad():
        logits[2, 5].scatter_(-1, ids[2, 5].clamp(min=0), 40.0)
    return logits, labels, ids, logprobs


@pytest.mark.parametrize("lam", [0.9, 0.5, 0.0])
def test_rest_bucket_equals_dense_formula_value_and_gradient(lam):
    logits, labels, ids, logprobs = rest_batch()
    logits.requires_grad_(True)
    ours = fusion_loss(logits, labels, ids, logprobs, lam=lam, rest_bucket=True)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = dense_rest_reference(logits, labels, ids, logprobs, lam)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.isfinite(ours) and abs(ours.item() - ref.item()) < 1e-10
    torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=0)


def test_rest_bucket_in_float32_stays_close_to_float64_when_kept_mass_is_one():
    """The student's kept mass within float32 rounding of 1: 1 - sum Q would be 0 (log -inf);
    the masked log-sum-exp keeps Q_rest ~ e-40 exactly."""
    logits, labels, ids, logprobs = rest_batch()
    ref = dense_rest_reference(logits.clone().requires_grad_(True), labels, ids, logprobs, 0.5)
    low = logits.float().requires_grad_(True)
    ours = fusion_loss(low, labels, ids, logprobs.float(), lam=0.5, rest_bucket=True)
    ours.backward()
    assert torch.isfinite(ours) and torch.isfinite(low.grad).all()
    assert abs(ours.item() - ref.item()) < 1e-4
    probe = logits.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(dense_rest_reference(probe, labels, ids, logprobs, 0.5), probe)
    torch.testing.assert_close(low.grad.double(), g_ref, atol=1e-6, rtol=0)


def test_rest_bucket_gradcheck_and_chunks():
    import fusellm.method.loss as loss_module

    logits, labels, ids, logprobs = rest_batch()
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: fusion_loss(x, labels, ids, logprobs, lam=0.7, rest_bucket=True), (logits,)
    )
    full = fusion_loss(logits, labels, ids, logprobs, rest_bucket=True)
    old = loss_module._CHUNK_ROWS
    loss_module._CHUNK_ROWS = 5
    try:
        chunked = fusion_loss(logits, labels, ids, logprobs, rest_bucket=True)
    finally:
        loss_module._CHUNK_ROWS = old
    assert abs(full.item() - chunked.item()) < 1e-12


def test_rest_bucket_is_renormalisation_when_nothing_was_dropped():
    """Rows whose top-k holds all the mass: the rest bucket is empty and both losses agree."""
    logits, labels, ids, _ = make_batch()
    logprobs = torch.log_softmax(torch.randn(ids.shape, dtype=torch.float64), -1)
    logprobs = torch.where(ids >= 0, logprobs, float("-inf"))
    valid = ids >= 0
    logprobs = logprobs - torch.logsumexp(
        torch.where(valid, logprobs, float("-inf")), -1, keepdim=True
    )
    plain = fusion_loss_parts(logits, labels, ids, logprobs, lam=0.5)
    rest = fusion_loss_parts(logits, labels, ids, logprobs, lam=0.5, rest_bucket=True)
    for a, b in zip(plain, rest):
        assert abs(a.item() - b.item()) < 1e-9


def test_rest_bucket_asks_for_the_kept_mass_only():
    """A student that already matches the teacher on the kept ids and the rest has zero
    gradient from the fusion term; renormalising would push it further onto the kept ids."""
    V, k = 12, 3
    q_full = torch.softmax(torch.randn(V, dtype=torch.float64), -1)
    top = q_full.topk(k)
    logits = q_full.log().view(1, 1, V).expand(1, 2, V).clone().requires_grad_(True)
    labels = torch.tensor([[0, 1]])
    ids = top.indices.view(1, 1, k).expand(1, 2, k).clone()
    logprobs = top.values.log().view(1, 1, k).expand(1, 2, k).clone()
    _, _, fuse = fusion_loss_parts(logits, labels, ids, logprobs, lam=0.0, rest_bucket=True)
    (grad,) = torch.autograd.grad(
        fusion_loss(logits, labels, ids, logprobs, lam=0.0, rest_bucket=True), logits
    )
    assert grad[0, 0].abs().max() < 1e-12
    (grad_renorm,) = torch.autograd.grad(
        fusion_loss(logits, labels, ids, logprobs, lam=0.0), logits
    )
    assert (grad_renorm[0, 0, top.indices] < 0).all()  # renormalised: raise the kept ids
    assert fuse.item() > 0


def test_rest_bucket_refuses_a_temperature_and_a_full_vocabulary():
    logits, labels, ids, logprobs = rest_batch()
    with pytest.raises(ValueError, match="temperature 1"):
        fusion_loss(logits, labels, ids, logprobs, temperature=2.0, rest_bucket=True)
    V = logits.shape[-1]
    full = torch.arange(V).expand(*ids.shape[:2], V)
    with pytest.raises(ValueError, match="below the vocabulary size"):
        fusion_loss(
            logits,
            labels,
            full,
            torch.full(full.shape, -5.0, dtype=torch.float64),
            rest_bucket=True,
        )
