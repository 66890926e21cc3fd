"""The end-to-end fusion flow: one MLflow parent run, every stage in order, cached by content.

`fuse(config)` takes the whole `FusionConfig` as its one typed parameter, so the Prefect UI's
"Run" page shows it as a form. The stages and their order are `fusellm.stages.pipeline`; each
unit of stage work is a task, and a unit whose content-addressed folder exists is ``Cached``.
"""

from __future__ import annotations

from fusellm_tasks.stages import PrefectExecutor
from prefect import flow, get_run_logger

from fusellm import tracking
from fusellm.config import FusionConfig
from fusellm.stages import pipeline
from fusellm.stages.registry import write_record


@flow(name="fuse", log_prints=True)
def fuse(config: FusionConfig) -> dict:
    """Fuse the sources into the target: pieces, extraction, alignment and fusion, training,
    evaluation against every source and the CLM baseline, registration in MLflow."""
    ex = PrefectExecutor()
    with tracking.fusion_run(
        config.name,
        experiment=config.tracking.experiment,
        params=config,
        tracking_uri=config.tracking.tracking_uri,
    ) as run_id:
        done = pipeline.walk(config, ex)
        summary = {
            "run_id": run_id,
            "scores": done.scores,
            "fused_model": str(done.trained["fused"].path / "model"),
            "comparison": str(done.comparison.path) if done.comparison else None,
            "registration": done.registration.info if done.registration else None,
            "states": ex.tally.as_dict(),
            "computed": ex.tally.computed(),
        }
        tracking.log_json(summary, "summary.json")
    write_record(config, done.identities, summary)
    get_run_logger().info(
        "fusion done: scores %s, registration %s", done.scores, summary["registration"]
    )
    return summary
