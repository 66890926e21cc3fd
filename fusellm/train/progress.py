"""Per-step progress of training: a console bar, and the step's metrics in the caller's run.

The orchestration layer owns the MLflow run; training only logs into it, through
`fusellm.tracking.log_metrics`, while it runs: the parts of the loss (CLM and fusion), the
learning rate, the gradient norm and the throughput. The total loss of each step is not logged
here: the training stage keeps it in its record, and the fusion logs it from there once, as
``train/<fused|baseline>/loss``, also when a finished stage folder is reused.
MLflow is looked up in `sys.modules` rather than imported: if nobody imported it, no run can be
active, and a plain `fusellm train` does not pay its import time.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

STAGE_RECORDED = {"loss"}  # logged by the fusion from the stage record, once


@dataclass
class StepMetrics:
    loss: float
    clm_loss: float
    fusion_loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_s: float


class StepLogger:
    """Rank 0 logs; other ranks stay silent."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, desc="train", disable=not enabled)

    def log(self, step: int, metrics: StepMetrics) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics.loss:.4f}", lr=f"{metrics.learning_rate:.2e}")
        mlflow = sys.modules.get("mlflow")
        active = mlflow.active_run() if mlflow is not None else None
        if active is not None:
            from fusellm.tracking import log_metrics

            values = {k: v for k, v in asdict(metrics).items() if k not in STAGE_RECORDED}
            log_metrics(values, step=step, prefix="train", run_id=active.info.run_id)

    def close(self) -> None:
        self.bar.close()
