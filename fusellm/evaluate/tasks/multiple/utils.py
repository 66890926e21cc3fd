"""lm-eval hook for the MultiPL-E tasks: the execution metric lives in fusellm.evaluate.multiple."""

from fusellm.evaluate.multiple import process_results  # noqa: F401
