"""The two work pools the deployments of infra/prefect.yaml run on, created or updated in place.

`fusellm-cpu` runs the `fuse` flow, `prepare` and `align-fuse`; `fusellm-gpu` runs `extract` and
`train`. A pool's base job template is where a stage's container gets its image, its network,
the shared work folder and the environment that points it at the stack's servers, so that the
deployments themselves carry no job variables and one prefect.yaml serves process, Docker and
Kubernetes pools alike.

The GPU pool gets a concurrency limit: a GPU stage run uses every GPU its container sees (one
model per GPU, `fusellm.stages.devices`), so two runs at once on one machine would put two
models on one device. The limit is the number of GPU machines; each GPU worker also takes one
run at a time (`prefect worker start --limit 1`).

Secrets never go into a template (Prefect shows templates to anyone who can read the pool):
jobs get paths to credentials files mounted from a volume, not the credentials.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field, replace

POOLS = {"cpu": "fusellm-cpu", "gpu": "fusellm-gpu"}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE", re.IGNORECASE)


class PoolSetupError(ValueError):
    """A pool setting that cannot be right: says which one and what was expected."""


@dataclass
class JobSettings:
    """What every container a pool starts gets (Docker pools; process pools use `env` only)."""

    cpu_image: str = "fusellm:cpu"
    gpu_image: str = "fusellm:cuda"
    network: str | None = None  # a Docker network, e.g. the compose stack's
    network_mode: str | None = None  # e.g. "host"
    volumes: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    gpus: str = ""  # "all", "0,1", or "" for none (the CPU-only stack)
    shm_size: str = "8g"  # PyTorch's data loaders and NCCL need more than Docker's 64 MB


def job_env(names: list[str], environ: dict[str, str]) -> dict[str, str]:
    """The named variables' values, to copy into the pools' templates; refuses secrets."""
    secret = [n for n in names if SECRET_NAME.search(n)]
    if secret:
        raise PoolSetupError(
            f"--job-env: {', '.join(secret)} look like secrets; pool templates are readable by "
            "anyone with access to the Prefect server. Mount a credentials file into the jobs "
            "instead (see infra/README.md)"
        )
    missing = [n for n in names if n not in environ]
    if missing:
        raise PoolSetupError(f"--job-env: {', '.join(missing)} not set in this environment")
    from fusellm.settings import without_credentials

    with_credentials = [n for n in names if without_credentials(environ[n]) != environ[n]]
    if with_credentials:
        raise PoolSetupError(
            f"--job-env: {', '.join(with_credentials)} hold user:password@ in a URL; give the "
            "jobs the credentials another way (MLFLOW_TRACKING_USERNAME / _PASSWORD from a file)"
        )
    return {n: environ[n] for n in names}


def _device_requests(gpus: str) -> list[dict]:
    if not gpus:
        return []
    if gpus == "all":
        return [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    if not re.fullmatch(r"\d+(,\d+)*", gpus):
        raise PoolSetupError(
            f"--gpus: expected 'all', device indexes like '0,1', or '', got {gpus!r}"
        )
    return [{"driver": "nvidia", "device_ids": gpus.split(","), "capabilities": [["gpu"]]}]


def _set_default(template: dict, variable: str, value) -> None:
    properties = template["variables"]["properties"]
    if variable not in properties:
        raise PoolSetupError(f"the pool type's job template has no variable {variable!r}")
    properties[variable]["default"] = value


def docker_template(role: str, settings: JobSettings) -> dict:
    """Prefect-docker's default base job template with this stack's defaults filled in."""
    from prefect_docker.worker import DockerWorker

    template = DockerWorker.get_default_base_job_template()
    gpu = role == "gpu"
    _set_default(template, "image", settings.gpu_image if gpu else settings.cpu_image)
    _set_default(template, "image_pull_policy", "IfNotPresent")
    _set_default(template, "env", dict(settings.env))
    _set_default(template, "volumes", list(settings.volumes))
    _set_default(template, "auto_remove", True)
    if settings.network:
        _set_default(template, "networks", [settings.network])
    if settings.network_mode:
        _set_default(template, "network_mode", settings.network_mode)
    # The images' entrypoint is the `fusellm` CLI; the worker's command is Prefect's own.
    create: dict = {"entrypoint": ["/usr/bin/env"]}
    if gpu:
        create["shm_size"] = settings.shm_size
    if gpu and settings.gpus:
        create["device_requests"] = _device_requests(settings.gpus)
    _set_default(template, "container_create_kwargs", create)
    return template


def process_template(settings: JobSettings) -> dict:
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    _set_default(template, "env", dict(settings.env))
    return template


HEARTBEAT_S = 30  # a flow run's heartbeat (Prefect's least); default 180 s
SILENT_S = 90  # a run whose heartbeats stop this long is marked crashed
CRASH_AUTOMATION = "fusellm: mark runs crashed when their heartbeats stop"


def with_heartbeats(settings: JobSettings) -> JobSettings:
    """Every job sends heartbeats (unless the settings set their own frequency), so that a run
    whose machine or worker is lost is seen to be lost (`ensure_crash_detection`)."""
    env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S), **settings.env}
    return replace(settings, env=env)


def crash_automation():
    """Prefect's recipe for runs that stop reporting (its "zombie flows" guide): a flow run
    whose last heartbeat is followed by neither another one nor an end within `SILENT_S` is
    set to Crashed, which is what `fusellm_flows.dispatch` starts a part again on."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=CRASH_AUTOMATION,
        description="Runs whose worker or machine was lost end Crashed instead of Running.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=SILENT_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {SILENT_S} s: its worker or machine was lost",
            )
        ],
    )


def ensure_crash_detection() -> str:
    """Create the automation of `crash_automation`, or update it to this version's;
    returns "created" or "updated"."""
    from prefect.automations import Automation

    wanted = crash_automation()
    try:
        found = Automation.read(name=CRASH_AUTOMATION)
    except ValueError:  # none of that name
        found = None
    if found is None:
        wanted.create()
        return "created"
    wanted.id = found.id
    wanted.update()
    return "updated"


def templates(kind: str, settings: JobSettings) -> dict[str, dict]:
    """Pool name -> base job template, for pools of `kind` (docker or process)."""
    settings = with_heartbeats(settings)
    if kind == "docker":
        return {name: docker_template(role, settings) for role, name in POOLS.items()}
    if kind == "process":
        return {name: process_template(settings) for name in POOLS.values()}
    raise PoolSetupError(f"--type: expected docker or process, got {kind!r}")


async def _ensure(kind: str, name: str, template: dict, limit: int | None) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            pool = await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=name, type=kind, base_job_template=template, concurrency_limit=limit
                )
            )
            return "created"
        if pool.type != kind:
            raise PoolSetupError(
                f"work pool {name} exists with type {pool.type}, not {kind}: delete it first "
                f"(prefect work-pool delete {name})"
            )
        update = {"base_job_template": template}
        if limit is not None:  # a limit set on the CPU pool by hand stays
            update["concurrency_limit"] = limit
        await client.update_work_pool(name, WorkPoolUpdate(**update))
        return "updated"


def ensure_pools(kind: str, settings: JobSettings, gpu_concurrency: int | None) -> dict[str, str]:
    """Create or update both pools; returns what happened to each ("created"/"updated")."""
    if gpu_concurrency is not None and gpu_concurrency < 1:
        raise PoolSetupError(f"--gpu-concurrency: expected 1 or more, got {gpu_concurrency}")
    limits = {POOLS["cpu"]: None, POOLS["gpu"]: gpu_concurrency}
    return {
        name: asyncio.run(_ensure(kind, name, template, limits[name]))
        for name, template in templates(kind, settings).items()
    }
