"""One stage of one fusion, measured in a process of its own (run by bench_scale.py).

    python benchmarks/_scale_child.py CONFIG.json STAGE

A fresh process per stage, so that each stage's peak memory is its own: the process walks the
real pipeline up to the stage before (those folders exist, so nothing is rebuilt), resets the
kernel's peak-RSS counter, then runs the stage with the library `Executor` and reads the peak
back. Memory is reported three ways, so the ~0.5 GB of imports cannot hide growth:

    peak_mb      the process's peak RSS over its whole life (VmHWM, imports included)
    start_mb     RSS when the stage starts (imports and the walk up to it)
    above_mb     peak RSS during the stage minus start_mb
    workers_mb   peak RSS (VmHWM) of the largest process the stage started (align-and-fuse's
                 workers with fusion.workers > 1), sampled from /proc while they run: the
                 kernel's RUSAGE_CHILDREN figure would also count any fork of this process
                 (training runs `git`) at the parent's size

CPU time (this process's threads and its reaped children) is reported beside wall time: on a
shared machine it is the steadier measure of work, and per core-second it is what the projection
scales.

The last line of stdout is `RESULT {json}`.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

# What the stage runs before the walk reaches it; "vocab" is the first part of align_fuse.
PREVIOUS = {
    "pieces": None,
    "extract": "prepare",
    "vocab": "extract",
    "align_fuse": "extract",
    "train": "align_fuse",
    "evaluate": "train",
}


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _cpu_seconds() -> float:
    """User + system time of this process and its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class DescendantPeaks(threading.Thread):
    """Samples the VmHWM of every process below this one until stopped; keeps the largest."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.peak_kb = every, 0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.wait(self.every):
            for child in me.children(recursive=True):
                try:
                    text = Path(f"/proc/{child.pid}/status").read_text()
                except OSError:
                    continue  # it ended between the listing and the read
                found = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
                if found:
                    self.peak_kb = max(self.peak_kb, int(found.group(1)))

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak_kb


def reset_peak() -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def preload() -> None:
    """Import what every stage imports, so the baseline holds the libraries, not the stage."""
    import numpy  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import fusellm.stages.pipeline  # noqa: F401


def timed_executor():
    """The library Executor, also adding up the wall time of the units of each stage."""
    from fusellm.stages.pipeline import Executor

    class TimedExecutor(Executor):
        def __init__(self):
            super().__init__()
            self.seconds: dict[str, float] = defaultdict(float)
            self.built: dict[str, int] = defaultdict(int)

        def _note(self, stage: str, started: float, artifacts) -> None:
            self.seconds[stage] += time.perf_counter() - started
            self.built[stage] += sum(not a.reused for a in artifacts)

        def run(self, unit):
            started = time.perf_counter()
            artifact = super().run(unit)
            self._note(unit.stage, started, [artifact])
            return artifact

        def run_all(self, units, workers=1):
            started = time.perf_counter()
            artifacts = super().run_all(units, workers)
            if units:
                self._note(units[0].stage, started, artifacts)
            return artifacts

    return TimedExecutor()


def run_stage(stage: str, f, ex) -> None:
    """The stage's step of the walk; `vocab` is align_fuse's first line on its own."""
    from fusellm.stages.fusion import vocab_unit
    from fusellm.stages.pipeline import STEPS

    if stage == "vocab":
        ex.run_all([vocab_unit(s, f.target, f.config) for s in f.sources])
    else:
        STEPS["prepare" if stage == "pieces" else stage](f, ex)


def summary(stage: str, f) -> dict:
    """What the stage made, in the numbers throughput is counted in."""
    if stage == "pieces":
        return {k: f.pieces.info[k] for k in ("pieces", "shards", "texts")}
    if stage == "extract":
        return {"tokens": {m.name: f.stores[m.identity].info["tokens"] for m in f.models}}
    if stage == "align_fuse":
        return {k: f.fused_data.info[k] for k in ("count", "tokens", "bytes")}
    if stage == "train":
        return {"tokens": {k: a.info["tokens"] for k, a in f.trained.items()}}
    if stage == "evaluate":
        return {"models": sum(len(s) for s in f.results.values())}
    return {}


def measure(config_path: str, stage: str) -> dict:
    from fusellm.config import parse_fusion_config
    from fusellm.stages.pipeline import Fusion, walk

    config = parse_fusion_config(json.loads(Path(config_path).read_text()))
    previous = PREVIOUS[stage]
    f = walk(config, timed_executor(), until=previous) if previous else Fusion(config)
    ex = timed_executor()
    hwm_before = _status_kb("VmHWM")
    start_kb = _status_kb("VmRSS")
    if not reset_peak():
        start_kb = hwm_before  # fall back: growth above the peak so far
    sampler = DescendantPeaks()
    sampler.start()
    cpu, started = _cpu_seconds(), time.perf_counter()
    run_stage(stage, f, ex)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    stage_peak = _status_kb("VmHWM")
    workers_kb = sampler.stop()
    return {
        "stage": stage,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "units": {k: round(v, 3) for k, v in ex.seconds.items()},
        "built": dict(ex.built),
        "peak_mb": max(hwm_before, stage_peak) / 1024,
        "start_mb": start_kb / 1024,
        "above_mb": max(stage_peak - start_kb, 0) / 1024,
        "workers_mb": workers_kb / 1024,
        **summary(stage, f),
    }


def main() -> None:
    config_path, stage = sys.argv[1:3]
    if stage not in PREVIOUS:
        raise SystemExit(f"unknown stage {stage!r}; expected one of {', '.join(PREVIOUS)}")
    preload()
    result = measure(config_path, stage)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
