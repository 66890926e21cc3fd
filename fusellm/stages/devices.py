"""Where extraction runs: each model on its own device, loaded once for all of its shards.

Extraction is one unit per model x pieces shard. Loading a 7B model for each unit would cost
~14,000 loads for MiniPile (docs/scaling.md §6.4), and units submitted at once (Prefect runs them
as concurrent tasks) would put several models on one GPU. So:

- **devices per model**: the visible GPUs are shared out among the fusion's models, and each
  model's shards go round robin over its own GPUs (`device_of`); two models share a GPU only
  when there are more models than GPUs;
- **one unit per device at a time**: a device runs its units one after the other
  (`DeviceSlots.use`), however many callers wait;
- **one load per model and device**: the model stays loaded between its units, and while units
  of the loaded model are waiting they go first, so that a device switches model as few times
  as possible (once per model when the units of one device are all submitted together);
- the models are dropped when the extraction stage ends (`DeviceSlots.release`), before
  training needs the memory.

Which device a unit ran on changes no number that is kept (float rounding at most), so it is
not part of any stage key.
"""

from __future__ import annotations

import gc
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_of(choice: str, place: int, gpus: int, *, models: int = 1, shard: int = 0) -> str:
    """Device of shard `shard` of the model at `place` among the fusion's `models`.

    ``cpu``: the CPU. ``cuda``: with at least as many GPUs as models, model `place` owns GPUs
    ``place, place + models, ...`` and its shards go round robin over them (8 GPUs, 3 models:
    3, 3 and 2 GPUs, each loading its model once); with fewer GPUs than models, model `place`
    goes to GPU ``place % gpus`` and shares it. An error without a GPU. ``auto``: ``cuda``
    when there is a GPU, else ``cpu``. Decided when a unit is built, not when it is planned: a
    plan made on a machine without a GPU stays valid.
    """
    if choice == "auto":
        choice = "cuda" if gpus else "cpu"
    if choice == "cpu":
        return "cpu"
    if choice != "cuda":
        raise ValueError(f"extraction.device: {choice!r}; expected auto, cpu or cuda")
    if gpus < 1:
        raise ValueError("extraction.device is cuda but no GPU is visible (CUDA_VISIBLE_DEVICES?)")
    if gpus < models:
        return f"cuda:{place % gpus}"
    own = list(range(place % models, gpus, models))
    return f"cuda:{own[shard % len(own)]}"


@dataclass
class _Slot:
    """One device: the model on it, and who is waiting for it."""

    busy: bool = False
    identity: str | None = None
    model: object | None = None
    waiting: Counter = field(default_factory=Counter)  # model identity -> units waiting


class DeviceSlots:
    """The devices of this process, one unit at a time each, models kept between units."""

    def __init__(self):
        self._cond = threading.Condition()
        self._slots: dict[str, _Slot] = {}
        self.loads: Counter = Counter()  # (device, identity) -> times loaded, for tests and logs

    @contextmanager
    def use(self, device: str, identity: str, load: Callable[[], object]) -> Iterator[object]:
        """The model `identity` on `device`, loaded by `load()` unless it is there already.

        Blocks while the device runs another unit, or while units of the model already loaded
        there are waiting and this one would evict it.
        """
        with self._cond:
            slot = self._slots.setdefault(device, _Slot())
            slot.waiting[identity] += 1
            self._cond.wait_for(lambda: self._may_start(slot, identity))
            slot.waiting[identity] -= 1
            slot.busy = True
        try:
            if slot.identity != identity:
                self._drop(slot, device)
                slot.model, slot.identity = load(), identity
                self.loads[(device, identity)] += 1
            yield slot.model
        finally:
            with self._cond:
                slot.busy = False
                self._cond.notify_all()

    @staticmethod
    def _may_start(slot: _Slot, identity: str) -> bool:
        if slot.busy:
            return False
        loaded_wanted = slot.identity is not None and slot.waiting[slot.identity] > 0
        return identity == slot.identity or not loaded_wanted

    def release(self) -> None:
        """Drop every idle model (the stage is over: training needs the memory)."""
        with self._cond:
            for device, slot in self._slots.items():
                if not slot.busy:
                    self._drop(slot, device)

    @staticmethod
    def _drop(slot: _Slot, device: str) -> None:
        if slot.model is None:
            return
        slot.model, slot.identity = None, None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


DEVICES = DeviceSlots()  # this process's devices, shared by every thread that extracts
