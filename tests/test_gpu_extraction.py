"""What a GPU worker's extraction run does with its GPUs, proved without a GPU.

The real extraction stage runs over two models and several shards each, its units submitted all
at once to a thread pool (as the Prefect executor submits them on a worker), with `device: cuda`
on a machine that pretends to have two GPUs: models are loaded through a stand-in that records
the device each load was meant for and keeps the weights on the CPU. Then:
- each model is loaded once for all of its shards (per device it got);
- the two models never share a device index;
- no device ever holds two units at once;
- every shard was extracted.
The pool-level limit (one GPU stage run per machine at a time) is tested on the real stack in
tests/test_stack.py.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

from fusion_fixtures import tiny_fusion_config

from fusellm.stages import pipeline


class ThreadedExecutor(pipeline.Executor):
    """Independent units all at once, each in a thread: the Prefect executor's concurrency."""

    def run_all(self, units, workers: int = 1):
        with ThreadPoolExecutor(max_workers=len(units) or 1) as pool:
            return list(pool.map(lambda u: u.run(), units))


class GpuProbe:
    """Loads that say which device they were for; spans of extraction per device."""

    def __init__(self):
        self.lock = threading.Lock()
        self.loads: Counter = Counter()
        self.device_of_model: dict[int, str] = {}
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def loader(self, real_load):
        probe = self

        def load_model(path, ref=None):
            model = real_load(path, ref)

            def to(device):
                with probe.lock:
                    probe.loads[(str(path), device)] += 1
                    probe.device_of_model[id(model)] = device
                return model  # stays on the CPU

            model.to = to
            return model

        return load_model

    def extractor(self, real_extract):
        def extract_topk(model, *args, **kwargs):
            started = time.monotonic()
            try:
                return real_extract(model, *args, **kwargs)
            finally:
                with self.lock:
                    device = self.device_of_model[id(model)]
                    self.spans[device].append((started, time.monotonic()))

        return extract_topk

    def most_at_once(self, device: str) -> int:
        edges = sorted(
            [(a, 1) for a, _ in self.spans[device]] + [(b, -1) for _, b in self.spans[device]]
        )
        running = peak = 0
        for _, step in edges:
            running += step
            peak = max(peak, running)
        return peak


def test_two_gpus_two_models_each_loaded_once_on_devices_of_its_own(tmp_path, monkeypatch):
    import fusellm.data.extract as extract_module
    from fusellm.io import sources
    from fusellm.stages import devices

    config = tiny_fusion_config(tmp_path)
    extraction = config.extraction.model_copy(update={"device": "cuda", "shard_size": 2})
    config = config.model_copy(update={"extraction": extraction})
    probe = GpuProbe()
    monkeypatch.setattr(devices, "gpu_count", lambda: 2)
    monkeypatch.setattr(sources, "load_model", probe.loader(sources.load_model))
    monkeypatch.setattr(
        extract_module, "extract_topk", probe.extractor(extract_module.extract_topk)
    )

    done = pipeline.walk(config, ThreadedExecutor(), until="extract")

    units = [p for p in (config.workdir / "extract").iterdir() if not p.name.startswith(".")]
    assert len(units) >= 2 * 4, "two models, four shards or more each"
    by_model = defaultdict(set)
    for (path, device), count in probe.loads.items():
        assert count == 1, f"{path} loaded {count} times on {device}"
        by_model[path].add(device)
    assert len(by_model) == 2
    first, second = by_model.values()
    assert first and second and not first & second, dict(by_model)  # no shared device index
    assert first | second == {"cuda:0", "cuda:1"}
    for device in ("cuda:0", "cuda:1"):
        assert probe.most_at_once(device) == 1, probe.spans[device]
    assert len(done.stores) == 2  # a whole store per model, from its shards
