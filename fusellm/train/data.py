"""The fused training data: checks before training, and a data order that resumes exactly.

The data is a top-k store in the target's vocabulary (`fusellm.data.store`): record i is one text
piece, its token ids and the fused next-token distribution at each position. Its order is a
pure function of (seed, epoch, step): a seeded permutation per epoch, cut into global batches,
each cut into per-rank micro batches. Resuming at step s therefore needs nothing but s, and the
order does not depend on the world size (only the split of a global batch does).

The permutation is two-level, so that reading stays sequential at the scale of shards: shards
are visited in a random order, `window` at a time, and the records of those shards are shuffled
together. A rank then loads (and checksums) each shard once per epoch instead of once per record
(a store shard of 1024 pieces of 2048 tokens is ~67 MB; the store keeps 4 open).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fusellm.data.store import MANIFEST, TopkStore, open_topk
from fusellm.io.fingerprint import tokenizer_fingerprint
from fusellm.train.config import TrainConfig, TrainConfigError


def _meta(store: TopkStore, key: str):
    return store.meta.get(key, store.manifest.get(key))


def open_training_data(
    data_dir, config: TrainConfig, tokenizer, *, model_vocab_size: int, world_size: int
) -> TopkStore:
    """Open the fused store and check it fits the target, the config and the launch.

    Runs before the model is built, so each problem is reported in seconds, naming the file
    or field: a missing folder, a store made with another tokenizer, a source the config
    expects but the store lacks, ids beyond the model's vocabulary, a global batch the ranks
    cannot split, or fewer records than one global batch.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrainConfigError(
            f"{data_dir}: training data folder not found (expected a fused top-k store)"
        )
    store = open_topk(data_dir)
    manifest = data_dir / MANIFEST
    expected = tokenizer_fingerprint(tokenizer)
    found = _meta(store, "tokenizer_fingerprint")
    if found != expected:
        raise TrainConfigError(
            f"{manifest}: tokenizer_fingerprint {found!r} differs from the target tokenizer's "
            f"{expected!r}; the data was made for another tokenizer"
        )
    if store.manifest["vocab_size"] > model_vocab_size:
        raise TrainConfigError(
            f"{manifest}: vocab_size {store.manifest['vocab_size']} exceeds the model's "
            f"vocabulary ({model_vocab_size})"
        )
    have = list(_meta(store, "sources") or [])
    for name in config.sources or []:
        if name not in have:
            raise TrainConfigError(
                f"sources: no fused distributions from source {name!r} in {manifest} "
                f"(its sources: {have})"
            )
    per_pass = config.micro_batch * world_size
    if config.global_batch % per_pass:
        raise TrainConfigError(
            f"global_batch: {config.global_batch} is not a multiple of micro_batch "
            f"({config.micro_batch}) x world size ({world_size})"
        )
    if len(store) < config.global_batch:
        raise TrainConfigError(
            f"global_batch: {config.global_batch} exceeds the {len(store)} records in {data_dir}"
        )
    return store


@dataclass(frozen=True)
class DataOrder:
    """Which records rank `rank` reads in micro step `micro` of optimizer step `step`.

    `shard_counts` are the record counts of the store's shards, in order.
    """

    shard_counts: tuple[int, ...]
    global_batch: int
    micro_batch: int
    world_size: int
    seed: int
    window: int = 2  # shards shuffled together; a batch then spans <= 2 * window open shards

    @classmethod
    def for_store(cls, store: TopkStore, config: TrainConfig, world_size: int) -> DataOrder:
        counts = tuple(int(s["count"]) for s in store.manifest["shards"])
        return cls(counts, config.global_batch, config.micro_batch, world_size, config.seed)

    @property
    def size(self) -> int:
        return sum(self.shard_counts)

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch  # the last partial batch is dropped

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else epochs * self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        return _epoch_permutation(self.shard_counts, self.window, self.seed + epoch)

    def indices(self, step: int, rank: int, micro: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch + (micro * self.world_size + rank) * self.micro_batch
        return self._permutation(epoch)[start : start + self.micro_batch].tolist()


@lru_cache(maxsize=2)
def _epoch_permutation(shard_counts: tuple[int, ...], window: int, seed: int) -> torch.Tensor:
    """Shards in a seeded random order, records shuffled within each window of shards."""
    gen = torch.Generator().manual_seed(seed)
    starts = [0]
    for count in shard_counts:
        starts.append(starts[-1] + count)
    shards = torch.randperm(len(shard_counts), generator=gen).tolist()
    parts = []
    for w in range(0, len(shards), window):
        ids = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in shards[w : w + window]])
        parts.append(ids[torch.randperm(len(ids), generator=gen)])
    return torch.cat(parts)
