"""Suite results: per-task metrics with stderr, the suite average, and where the sample logs are."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fusellm.io.files import write_text_atomic


@dataclass
class SuiteResult:
    """Scores of one model on one suite.

    metrics / stderr: task -> metric -> value (lm-eval's "metric,filter" keys without the filter).
    average: mean over tasks of the suite's primary metric (None when no task reports it).
    skipped: task -> why it did not run (e.g. a compiler that is not installed).
    """

    suite: str
    model: str
    primary_metric: str
    higher_is_better: bool
    metrics: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    samples_dir: str | None = None
    n_samples: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def average(self) -> float | None:
        values = [m[self.primary_metric] for m in self.metrics.values() if self.primary_metric in m]
        values = [v for v in values if v is not None and not math.isnan(v)]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict:
        return {**asdict(self), "average": self.average}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> SuiteResult:
        data = {k: v for k, v in data.items() if k != "average"}
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> SuiteResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(Path(path), self.to_json())


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" for a stderr it could not compute


def parse_lm_eval(results: dict, tasks: list[str]) -> tuple[dict, dict]:
    """Split lm-eval's {"metric,filter": value, "metric_stderr,filter": value} per task."""
    metrics: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    for task in tasks:
        row = results.get(task, {})
        metrics[task], stderr[task] = {}, {}
        for key, value in row.items():
            if "," not in key:
                continue  # "alias", "samples", ...
            name, _filter = key.split(",", 1)
            if name.endswith("_stderr"):
                target, name = stderr[task], name[: -len("_stderr")]
            else:
                target = metrics[task]
            number = _number(value)
            if number is not None and name not in target:
                target[name] = number
    return metrics, stderr
