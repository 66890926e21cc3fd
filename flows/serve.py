"""The deployments `fusellm serve` serves: the same ten as infra/prefect.yaml, run in place.

Served (Prefect's `serve`), not sent to a work pool: the flow runs start as subprocesses of this
command, with its environment (the data folder, the Prefect server, the MLflow store), so "Run"
in the Prefect UI needs nothing else running. The deployments load the flows by module path
(`fusellm_flows.fuse.fuse`...), so they run from any working folder.
"""

from __future__ import annotations

from pathlib import Path

from fusellm.config import FusionConfig

REFUSION_CRON = "0 3 * * 1"  # Mondays 03:00 UTC, as in infra/prefect.yaml


def deployments(config_file: Path, config: FusionConfig) -> list:
    """`fuse`, `prepare`, `extract`, `align-fuse`, `train` with `config` as the form's default,
    `refusion` on its weekly schedule reading `config_file`, and the parts `fuse` fans out
    (`extract-part`, `train-part`, `evaluate-part`, `train-node`), which take their parameters from it."""
    from prefect.deployments.runner import EntrypointType

    from fusellm_flows import stages, units
    from fusellm_flows.fuse import fuse
    from fusellm_flows.refusion import refusion

    form = {"config": config.model_dump(mode="json")}
    common = {"entrypoint_type": EntrypointType.MODULE_PATH}
    out = [
        fuse.to_deployment(
            "fuse",
            parameters=form,
            description="Fuse source LLMs into the target (FuseLLM), tracked in MLflow.",
            tags=["fusellm"],
            **common,
        ),
        refusion.to_deployment(
            "refusion",
            parameters={"config_path": str(config_file)},
            cron=REFUSION_CRON,  # in UTC
            description="Re-fuse when a source, the target or the corpus changed; else nothing.",
            tags=["fusellm", "scheduled"],
            **common,
        ),
    ]
    for name, stage_flow in (
        ("prepare", stages.prepare),
        ("extract", stages.extract),
        ("align-fuse", stages.align_fuse),
        ("train", stages.train),
    ):
        out.append(
            stage_flow.to_deployment(name, parameters=form, tags=["fusellm", "stage"], **common)
        )
    for name, part_flow in (
        ("extract-part", units.extract_part),
        ("train-part", units.train_part),
        ("evaluate-part", units.evaluate_part),
        ("train-node", stages.train_node),
    ):
        out.append(part_flow.to_deployment(name, tags=["fusellm", "part"], **common))
    return out


def serve_deployments(config_file: Path, config: FusionConfig) -> None:
    """Serve the deployments until Ctrl-C or SIGTERM (then runs in progress are cancelled)."""
    from prefect import serve

    serve(*deployments(config_file, config), print_starting_message=False)
