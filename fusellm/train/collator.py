"""Batch top-k records into padded tensors, vectorised, with sparse targets only.

The published collator built a dense [batch, length, vocab] target per source with Python
loops over tokens (~130 MB per sample at V = 32k). Here a batch is padded once with one boolean
mask assignment per array; the fused distribution stays [batch, length, k] (ids + log-probs),
and the loss gathers the student's logits at those ids (`fusellm.method.loss`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fusellm.data.store import TopkRecord
from fusellm.method.loss import IGNORE_INDEX


def _pad(arrays: list[np.ndarray], mask: np.ndarray, fill, dtype) -> np.ndarray:
    """Place variable-length rows into a [B, L, ...] array at once, `fill` elsewhere."""
    out = np.full(mask.shape + arrays[0].shape[1:], fill, dtype=dtype)
    out[mask] = np.concatenate(arrays)
    return out


def collate(
    records: Sequence[TopkRecord], *, pad_id: int, max_length: int, with_topk: bool = True
) -> dict[str, torch.Tensor]:
    """Pad records to the longest one (cut at `max_length`).

    Returns input_ids, attention_mask and labels [B, L] (labels -100 on padding, and on every
    token a chat record does not train: `TopkRecord.trained`), and with
    `with_topk` topk_ids [B, L, k] (int64, -1 on padding) and topk_logprobs (float32, -inf).
    For the CLM baseline (`with_topk=False`) the top-k arrays are never touched.
    """
    if not records:
        raise ValueError("collate needs at least one record")
    lengths = np.array([min(len(r), max_length) for r in records])
    mask = np.arange(lengths.max())[None, :] < lengths[:, None]
    ids = _pad([r.input_ids[:max_length] for r in records], mask, pad_id, np.int64)
    labels = np.where(mask, ids, IGNORE_INDEX)
    for row, r in enumerate(records):  # chat pieces: only what the assistant says is learnt
        if r.trained is not None:
            n = lengths[row]
            labels[row, 1:n][~r.trained[: n - 1]] = IGNORE_INDEX  # position t predicts t + 1
            labels[row, 0] = IGNORE_INDEX  # no position predicts the first token
    batch = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "labels": torch.from_numpy(labels),
    }
    if with_topk:
        batch["topk_ids"] = torch.from_numpy(
            _pad([r.ids[:max_length] for r in records], mask, -1, np.int64)
        )
        batch["topk_logprobs"] = torch.from_numpy(
            _pad([r.logprobs[:max_length] for r in records], mask, -np.inf, np.float32)
        )
    return batch
