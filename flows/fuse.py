"""The end-to-end fusion flow: one MLflow parent run, every stage in order, cached by content.

`fuse(config)` takes the whole `FusionConfig` as its one typed parameter, so the Prefect UI's
"Run" page shows it as a form. The stages and their order are `fusellm.stages.pipeline`; each
unit of stage work is a task, and a unit whose content-addressed folder exists is ``Cached``.

Wherever it runs (`fusellm run`, `fusellm serve`, a worker), the flow first applies the
project's tracking defaults (`fusellm.settings.apply_tracking_defaults`), so it tracks to the
project's MLflow store unless a tracking server is configured. Its run is named
``<config name>-<config hash>-<time>``; it ends with a markdown artifact (decision, links to
the MLflow run and model version, the comparison table), which is also the MLflow run's
description.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact

from fusellm import tracking
from fusellm.config import FusionConfig
from fusellm.settings import apply_tracking_defaults, prefect_ui_url
from fusellm.stages import pipeline
from fusellm.stages.registry import write_record
from fusellm.tracking.orphans import set_orchestrator_run
from fusellm_flows.dispatch import run_evaluation_parts, run_stage_deployments
from fusellm_tasks.stages import PrefectExecutor


def fusion_run_name() -> str:
    """``<config name>-<8 hex of the config>-<UTC time>``, from the run's own parameters."""
    config = runtime.flow_run.parameters.get("config")
    if not isinstance(config, FusionConfig):
        config = FusionConfig.model_validate(config)
    return tracking.readable_run_name(config)


def prefect_run_over(flow_run_id: str) -> bool | None:
    """Whether a Prefect flow run has ended (or no longer exists); None when the server
    cannot say. Runs left RUNNING in MLflow by a lost process are closed on this answer."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectException

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except ObjectNotFound:
        return True
    except (httpx.HTTPError, PrefectException, OSError, ValueError):
        return None  # the server unreachable or the id not one: leave the run to a later fusion
    return state is not None and state.is_final()


def _links(run_id: str, registration: dict | None) -> dict[str, str]:
    links = {"MLflow run": tracking.run_url(run_id)}
    if registration:
        name, version = registration["name"], registration["version"]
        links[f"Model {name} version {version}"] = tracking.model_version_url(name, version)
    flow_run = runtime.flow_run.id
    if flow_run:
        links["Prefect flow run"] = f"{prefect_ui_url()}/runs/flow-run/{flow_run}"
    return links


def _artifact_key(name: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return f"fusion-{slug or 'run'}"


@flow(name="fuse", log_prints=True, flow_run_name=fusion_run_name)
def fuse(config: FusionConfig) -> dict:
    """Fuse the sources into the target: pieces, extraction, alignment and fusion, training,
    evaluation against every source and the CLM baseline, registration in MLflow."""
    apply_tracking_defaults()
    set_orchestrator_run(runtime.flow_run.id)
    ex = PrefectExecutor()
    title = runtime.flow_run.name or config.name
    with tracking.fusion_run(
        config.name,
        experiment=config.tracking.experiment,
        params=config,
        tracking_uri=config.tracking.tracking_uri,
        tags={"fusellm.flow_run": title},
        run_over=prefect_run_over,
    ) as run_id:
        tracking.log_fusion_inputs(config)
        if config.execution == "deployments":  # the heavy stages where their pools put them
            run_stage_deployments(config)
            run_evaluation_parts(config)
        done = pipeline.walk(config, ex)
        registration = done.registration.info if done.registration else None
        links = _links(run_id, registration)
        comparison = done.comparison.path / "comparison.md" if done.comparison else None
        table = Path(comparison).read_text() if comparison else None
        page = tracking.fusion_markdown(
            title, comparison_md=table, registration=registration, links=links
        )
        own = {k: v for k, v in links.items() if k != "MLflow run"}  # the run's own page
        tracking.set_description(
            tracking.fusion_markdown(
                title, comparison_md=table, registration=registration, links=own
            )
        )
        summary = {
            "run_id": run_id,
            "run_name": title,
            "scores": done.scores,
            "fused_model": str(done.trained["fused"].path / "model"),
            "comparison": str(done.comparison.path) if done.comparison else None,
            "registration": registration,
            "links": links,
            "states": ex.tally.as_dict(),
            "computed": ex.tally.computed(),
        }
        tracking.log_json(summary, "summary.json")
    write_record(config, done.identities, summary)
    create_markdown_artifact(
        markdown=page,
        key=_artifact_key(config.name),
        description=f"{config.name}: {tracking.decision_line(registration)}",
    )
    get_run_logger().info(
        "fusion done: scores %s, registration %s; MLflow run %s",
        done.scores,
        registration,
        links["MLflow run"],
    )
    return summary
