"""Extraction's devices (fusellm.stages.devices), without a GPU: which device each model gets,
one unit per device at a time, each model loaded once for all of its units."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from fusellm.stages.devices import DeviceSlots, device_of


def test_models_get_gpus_of_their_own_while_there_are_enough():
    def gpus_of(model: int, gpus: int, models: int = 3) -> set[str]:
        return {device_of("cuda", model, gpus, models=models, shard=s) for s in range(20)}

    assert [gpus_of(m, 8) for m in range(3)] == [
        {"cuda:0", "cuda:3", "cuda:6"},
        {"cuda:1", "cuda:4", "cuda:7"},
        {"cuda:2", "cuda:5"},
    ]  # 8 GPUs for 3 models: every GPU busy, no two models on one
    assert [gpus_of(m, 3) for m in range(3)] == [{"cuda:0"}, {"cuda:1"}, {"cuda:2"}]
    assert [gpus_of(m, 2) for m in range(3)] == [{"cuda:0"}, {"cuda:1"}, {"cuda:0"}]
    assert device_of("auto", 0, 1) == "cuda:0"
    assert {device_of("auto", i, 0) for i in range(3)} == {"cpu"}
    assert device_of("cpu", 5, 8) == "cpu"
    with pytest.raises(ValueError, match="no GPU is visible"):
        device_of("cuda", 0, 0)
    with pytest.raises(ValueError, match="expected auto, cpu or cuda"):
        device_of("tpu", 0, 1)


class Probe:
    """Units that record when they ran on which device, and loads that count themselves."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spans: list[tuple[str, float, float]] = []
        self.loaded: Counter = Counter()

    def unit(self, slots: DeviceSlots, device: str, model: str, seconds: float) -> str:
        def load():
            with self.lock:
                self.loaded[(device, model)] += 1
            return f"weights of {model}"

        with slots.use(device, model, load) as weights:
            started = time.time()
            time.sleep(seconds)
            with self.lock:
                self.spans.append((device, started, time.time()))
            return weights

    def most_at_once(self, device: str) -> int:
        edges = sorted(
            [(a, 1) for d, a, _ in self.spans if d == device]
            + [(b, -1) for d, _, b in self.spans if d == device]
        )
        now = most = 0
        for _, step in edges:
            now += step
            most = max(most, now)
        return most


def test_one_unit_per_device_and_one_load_per_model():
    """Units of three models submitted at once, interleaved, as Prefect submits them."""
    slots, probe = DeviceSlots(), Probe()
    jobs = [("cuda:0", m, 0.3 if i == 0 else 0.05) for i, m in enumerate("ABCABCABC")]
    with ThreadPoolExecutor(len(jobs)) as callers:
        got = list(callers.map(lambda j: probe.unit(slots, *j), jobs))
    assert got == [f"weights of {m}" for m in "ABCABCABC"]
    assert probe.most_at_once("cuda:0") == 1
    assert probe.loaded == Counter({("cuda:0", m): 1 for m in "ABC"})
    assert slots.loads == probe.loaded


def test_devices_work_at_the_same_time():
    slots, probe = DeviceSlots(), Probe()
    jobs = [("cuda:0", "A", 0.3), ("cuda:1", "B", 0.3)]
    with ThreadPoolExecutor(2) as callers:
        list(callers.map(lambda j: probe.unit(slots, *j), jobs))
    (_, a0, a1), (_, b0, b1) = sorted(probe.spans)
    assert max(a0, b0) < min(a1, b1)  # the two spans overlap


def test_release_drops_the_models_and_a_failed_load_leaves_nothing():
    slots, probe = DeviceSlots(), Probe()
    probe.unit(slots, "cpu", "A", 0)
    probe.unit(slots, "cpu", "A", 0)
    slots.release()
    probe.unit(slots, "cpu", "A", 0)
    assert probe.loaded[("cpu", "A")] == 2

    def broken():
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"), slots.use("cpu", "B", broken):
        pass
    probe.unit(slots, "cpu", "B", 0)  # the device is free again, and B loads for real
    assert probe.loaded[("cpu", "B")] == 1
