"""The work pools' base job templates (flows/pools.py): what every stage container gets, and
what never goes into a template (secrets). Creating the pools on a server: tests/test_stack.py."""

from __future__ import annotations

import pytest

from fusellm_flows.pools import (
    HEARTBEAT_S,
    SILENT_S,
    JobSettings,
    PoolSetupError,
    crash_automation,
    job_env,
    templates,
)

HEARTBEATS = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}


def _defaults(template: dict) -> dict:
    return {k: v.get("default") for k, v in template["variables"]["properties"].items()}


def test_docker_pools_give_stage_containers_image_network_volumes_and_gpus():
    settings = JobSettings(
        cpu_image="reg.example/fusellm:cpu",
        gpu_image="reg.example/fusellm:cuda",
        network="fusellm",
        volumes=["fusellm-work:/data/fusellm"],
        env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        gpus="all",
    )
    made = templates("docker", settings)
    cpu, gpu = _defaults(made["fusellm-cpu"]), _defaults(made["fusellm-gpu"])
    assert (cpu["image"], gpu["image"]) == ("reg.example/fusellm:cpu", "reg.example/fusellm:cuda")
    for pool in (cpu, gpu):
        assert pool["networks"] == ["fusellm"]
        assert pool["volumes"] == ["fusellm-work:/data/fusellm"]
        assert pool["env"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", **HEARTBEATS}
        # The images' entrypoint is the fusellm CLI: Prefect's command must run as given.
        assert pool["container_create_kwargs"]["entrypoint"] == ["/usr/bin/env"]
    assert "device_requests" not in cpu["container_create_kwargs"]
    assert gpu["container_create_kwargs"]["device_requests"] == [
        {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    ]
    assert gpu["container_create_kwargs"]["shm_size"] == "8g"
    some = _defaults(templates("docker", JobSettings(gpus="0,1"))["fusellm-gpu"])
    assert some["container_create_kwargs"]["device_requests"][0]["device_ids"] == ["0", "1"]
    none = _defaults(templates("docker", JobSettings(gpus=""))["fusellm-gpu"])
    assert "device_requests" not in none["container_create_kwargs"]


def test_process_pools_carry_the_environment_only():
    made = templates("process", JobSettings(env={"FUSELLM_HOME": "/shared/fusellm"}))
    assert set(made) == {"fusellm-cpu", "fusellm-gpu"}
    env = {"FUSELLM_HOME": "/shared/fusellm", **HEARTBEATS}
    assert all(_defaults(t)["env"] == env for t in made.values())


def test_jobs_send_heartbeats_at_a_frequency_the_settings_may_override():
    """Without heartbeats a run whose worker is lost stays Running forever (flows/dispatch.py)."""
    own = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "60"}
    made = templates("process", JobSettings(env=own))
    assert all(_defaults(t)["env"] == own for t in made.values())


def test_the_crash_automation_marks_silent_runs_crashed():
    from prefect.client.schemas.objects import StateType

    automation = crash_automation()
    trigger = automation.trigger
    assert trigger.posture == "Proactive"
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert "prefect.flow-run.heartbeat" in trigger.expect
    assert trigger.within.total_seconds() == SILENT_S >= 3 * HEARTBEAT_S
    assert [a.state for a in automation.actions] == [StateType.CRASHED]


def test_bad_settings_are_refused_with_what_was_expected():
    with pytest.raises(PoolSetupError, match="look like secrets"):
        job_env(["MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY"], {})
    with pytest.raises(PoolSetupError, match="MLFLOW_TRACKING_PASSWORD"):
        job_env(["MLFLOW_TRACKING_PASSWORD"], {"MLFLOW_TRACKING_PASSWORD": "x"})
    with pytest.raises(PoolSetupError, match="MLFLOW_TRACKING_URI hold user:password@"):
        job_env(["MLFLOW_TRACKING_URI"], {"MLFLOW_TRACKING_URI": "https://me:pw@mlflow.example"})
    with pytest.raises(PoolSetupError, match="FUSELLM_HOME not set"):
        job_env(["FUSELLM_HOME"], {})
    assert job_env(["AWS_SHARED_CREDENTIALS_FILE"], {"AWS_SHARED_CREDENTIALS_FILE": "/run/c"}) == {
        "AWS_SHARED_CREDENTIALS_FILE": "/run/c"
    }
    with pytest.raises(PoolSetupError, match="expected 'all', device indexes"):
        templates("docker", JobSettings(gpus="two"))
    with pytest.raises(PoolSetupError, match="expected docker or process"):
        templates("kubernetes", JobSettings())
