"""Evaluation stage: lm-eval suites (BBH, CommonSense, MultiPL-E, local) and the comparison.

`run_suite(model, suite, output_dir=...)` scores a model folder or an in-memory model on one
suite and keeps lm-eval's sample logs; `compare(results, fused, baseline, sources, output_dir)`
writes the fused-vs-sources-vs-CLM table and chart. Task definitions are YAML under `tasks/`;
suites are declared in `suites.yaml`.
"""

from fusellm.evaluate.data import DataError, EvalDataSource
from fusellm.evaluate.report import Comparison, compare
from fusellm.evaluate.results import SuiteResult
from fusellm.evaluate.runner import run_suite
from fusellm.evaluate.suites import get_suite, resolve, suites

__all__ = [
    "Comparison",
    "DataError",
    "EvalDataSource",
    "SuiteResult",
    "compare",
    "get_suite",
    "resolve",
    "run_suite",
    "suites",
]
