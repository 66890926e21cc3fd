"""The end-to-end fusion flow: one MLflow parent run, every stage in order, cached by content.

`fuse(config)` takes the whole `FusionConfig` as its one typed parameter, so the Prefect UI's
"Run" page shows it as a form. A re-run of unchanged inputs finds every task in the cache and
trains nothing; changing one source recomputes only its extraction, the fusion, training and
evaluation (content keys, `fusellm.pipeline`).
"""

from __future__ import annotations

from prefect import flow

from fusellm import pipeline, tracking
from fusellm.config import FusionConfig
from flows import steps


@flow(name="fuse", log_prints=True)
def fuse(config: FusionConfig) -> dict:
    """Fuse the sources into the target: pieces, extraction, alignment and fusion, training,
    evaluation against every source and the CLM baseline, registration in MLflow."""
    report = steps.Report()
    with tracking.fusion_run(
        config.name,
        experiment=config.tracking.experiment,
        params=config,
        tracking_uri=config.tracking.tracking_uri,
    ) as run_id:
        prepared = steps.prepare(config, report)
        tracking.set_tags(steps.source_tags(prepared.identities))
        stores = steps.extract(config, prepared, report)
        fused = steps.align_and_fuse(config, prepared, stores, report)
        trained = steps.train(config, prepared, stores, fused, report)
        results, comparison = steps.evaluate(config, prepared, trained, report)
        scores = pipeline.primary_scores(results, config.primary_suite)
        registration = None
        if config.tracking.register_model:
            with tracking.stage_run("register"):
                state = pipeline.register_fused(trained["fused"], scores, config, config.workdir)
                registration = state.info
            tracking.set_tags(
                {
                    "fusellm.registered_version": registration["version"],
                    "fusellm.role": "champion" if registration["is_champion"] else "challenger",
                }
            )
        summary = {
            "run_id": run_id,
            "scores": scores,
            "fused_model": str(trained["fused"].path / "model"),
            "comparison": str(comparison.path) if comparison else None,
            "registration": registration,
            "states": report.as_dict(),
            "computed": report.computed(),
        }
        tracking.log_json(summary, "summary.json")
    pipeline.write_record(config, prepared.identities, summary)
    steps.log("fusion done: scores %s, registration %s", scores, registration)
    return summary
