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
