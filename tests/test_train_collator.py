"""The collator pads with sparse targets only; the data order is a resumable pure function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusellm.data.store import TopkRecord
from fusellm.method.loss import fusion_loss_parts
from fusellm.testing.synthetic import synthetic_records
from fusellm.train.collator import collate
from fusellm.train.data import DataOrder


def _records(lengths, k=3, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    return synthetic_records([rng.integers(0, vocab, n).tolist() for n in lengths], vocab, top_k=k)


def test_padding_and_labels():
    recs = _records([5, 2, 4])
    batch = collate(recs, pad_id=7, max_length=16)
    assert batch["input_ids"].shape == (3, 5) and batch["topk_ids"].shape == (3, 5, 3)
    assert batch["attention_mask"].sum(1).tolist() == [5, 2, 4]
    assert batch["input_ids"][1].tolist() == recs[1].input_ids.tolist() + [7, 7, 7]
    assert batch["labels"][1].tolist() == recs[1].input_ids.tolist() + [-100, -100, -100]
    assert (batch["topk_ids"][1, 2:] == -1).all() and torch.isneginf(
        batch["topk_logprobs"][1, 2:]
    ).all()
    assert torch.equal(batch["topk_ids"][2, :4], torch.from_numpy(recs[2].ids))
    assert torch.equal(batch["topk_logprobs"][0], torch.from_numpy(recs[0].logprobs))
    assert batch["topk_ids"].dtype == torch.int64 and batch["topk_logprobs"].dtype == torch.float32


def test_truncation_and_clm_batches_have_no_topk():
    batch = collate(_records([9, 3]), pad_id=0, max_length=4, with_topk=False)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].sum().item() == 7
    with pytest.raises(ValueError, match="at least one record"):
        collate([], pad_id=0, max_length=4)


def test_collated_batch_drives_the_loss_like_one_record_alone():
    """Padding changes nothing: a padded row's loss equals the loss of the row on its own."""
    torch.manual_seed(0)
    recs = _records([6, 3], vocab=20)
    logits = torch.randn(2, 6, 20)
    both = collate(recs, pad_id=0, max_length=8)
    alone = collate(recs[1:], pad_id=0, max_length=8)
    _, clm_b, fuse_b = fusion_loss_parts(
        logits[1:], both["labels"][1:], both["topk_ids"][1:], both["topk_logprobs"][1:], lam=0.5
    )
    _, clm_a, fuse_a = fusion_loss_parts(
        logits[1:, :3], alone["labels"], alone["topk_ids"], alone["topk_logprobs"], lam=0.5
    )
    assert torch.allclose(clm_b, clm_a) and torch.allclose(fuse_b, fuse_a)


@pytest.mark.parametrize("rest_bucket", [False, True])
def test_padding_changes_nothing_with_or_without_the_rest_bucket(rest_bucket):
    """The rest bucket reads 1 - sum of the stored probabilities: padded rows (-1 / -inf)
    add no mass, and the collated values are the stored ones, not renormalised."""
    torch.manual_seed(0)
    recs = _records([6, 3], vocab=20)
    for r in recs:  # a teacher that keeps 40 % of its mass in the top-k
        r.logprobs = (r.logprobs + np.log(0.4)).astype(np.float32)
    logits = torch.randn(2, 6, 20, dtype=torch.float64)
    both = collate(recs, pad_id=0, max_length=8)
    alone = collate(recs[1:], pad_id=0, max_length=8)
    kept = both["topk_logprobs"][1, :3].double().exp().sum(-1)
    stored = torch.from_numpy(np.exp(recs[1].logprobs.astype(np.float64)).sum(-1))
    assert torch.allclose(kept, stored) and (kept < 0.41).all()
    b = fusion_loss_parts(
        logits[1:],
        both["labels"][1:],
        both["topk_ids"][1:],
        both["topk_logprobs"][1:],
        lam=0.5,
        rest_bucket=rest_bucket,
    )
    a = fusion_loss_parts(
        logits[1:, :3],
        alone["labels"],
        alone["topk_ids"],
        alone["topk_logprobs"],
        lam=0.5,
        rest_bucket=rest_bucket,
    )
    assert all(torch.allclose(x, y) for x, y in zip(a, b))


def test_synthetic_records_put_the_next_token_first():
    rec = synthetic_records([[4, 9, 2]], 10, top_k=4, seed=1)[0]
    assert isinstance(rec, TopkRecord) and rec.ids[:2, 0].tolist() == [9, 2]
    assert (rec.logprobs[:, 0] == rec.logprobs.max(1)).all() and (
        np.exp(rec.logprobs).sum(1) < 1
    ).all()


def _order(world_size=2, seed=3, counts=(20,), **kw):
    return DataOrder(
        shard_counts=counts, global_batch=8, micro_batch=2, world_size=world_size, seed=seed, **kw
    )


def test_data_order_covers_each_epoch_once_and_splits_ranks():
    order = _order()
    assert order.steps_per_epoch == 2 and order.accumulation == 2
    for epoch in range(2):
        seen = [
            i
            for step in range(epoch * 2, epoch * 2 + 2)
            for rank in range(2)
            for micro in range(2)
            for i in order.indices(step, rank, micro)
        ]
        assert len(seen) == 16 == len(set(seen))
    # the order depends on seed and step only: a fresh object (a resumed run) agrees
    assert _order().indices(3, 1, 1) == order.indices(3, 1, 1)
    first = [order.indices(0, r, m) for r in range(2) for m in range(2)]
    assert first != [order.indices(2, r, m) for r in range(2) for m in range(2)]  # epochs differ
    assert first != [_order(seed=4).indices(0, r, m) for r in range(2) for m in range(2)]
    # one rank reading the whole global batch sees the same records as two ranks together
    two = sorted(i for r in range(2) for m in range(2) for i in order.indices(1, r, m))
    one = sorted(i for m in range(4) for i in _order(world_size=1).indices(1, 0, m))
    assert one == two


def test_data_order_reads_few_shards_at_a_time():
    """Shards are shuffled a window at a time: a global batch touches at most 2 windows."""
    counts = (16,) * 10
    order = _order(counts=counts, window=2)
    shard_of = [s for s, n in enumerate(counts) for _ in range(n)]
    batches = [
        {shard_of[i] for r in range(2) for m in range(2) for i in order.indices(step, r, m)}
        for step in range(order.steps_per_epoch)
    ]
    assert max(len(b) for b in batches) <= 4
    assert sorted(
        i
        for step in range(20)
        for r in range(2)
        for m in range(2)
        for i in order.indices(step, r, m)
    ) == list(range(160))
    # yet the shard order itself is shuffled
    visits = [
        shard_of[i]
        for step in range(20)
        for r in range(2)
        for m in range(2)
        for i in order.indices(step, r, m)
    ]
    first_seen = list(dict.fromkeys(visits))
    assert sorted(first_seen) == list(range(10)) and first_seen != sorted(first_seen)
