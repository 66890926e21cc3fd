"""The Kubernetes base job template of the GPU pool (infra/kubernetes/gpu-base-job-template.json).

Rendered the way a Prefect Kubernetes worker renders it, the template must make a Job that the
Kubernetes API accepts (checked against its schema, strictly: a misspelled field fails) and that
lands on a GPU node with its GPUs, the shared work folder and a large /dev/shm. No cluster is
needed: `prefect work-pool create fusellm-gpu --type kubernetes --base-job-template FILE` takes
the file as it is.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
from prefect.utilities.templating import apply_values, find_placeholders

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = json.loads((REPO / "infra/kubernetes/gpu-base-job-template.json").read_text())
VARIABLES = TEMPLATE["variables"]["properties"]
DEFAULTS = {k: v["default"] for k, v in VARIABLES.items() if v.get("default") is not None}
# The oldest schema that the dev dependency (kubernetes-validate>=1.30) is sure to ship.
K8S_VERSION = "1.30.0"
# What a flow run's container gets from the worker itself, whatever the template says.
WORKER_ENV = {"PREFECT_API_URL": "http://prefect-server:4200/api"}
WORKER_COMMAND = ["prefect", "flow-run", "execute"]
# prefect-kubernetes refuses a job manifest without these paths and values (its
# `_get_base_job_manifest`); parallelism and completions sit, oddly, in the pod spec.
WORKER_REQUIRED = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"labels": {}},
    "spec": {
        "template": {
            "spec": {
                "parallelism": 1,
                "completions": 1,
                "restartPolicy": "Never",
                "containers": [{"name": "prefect-job"}],
            }
        }
    },
}


def render(**values) -> dict:
    """The job configuration for a flow run: the variables' defaults overridden by `values`,
    placeholders replaced by Prefect's own templating, then what the worker adds: labels, its
    environment before the template's env list, and its command as the container's args."""
    config = apply_values(TEMPLATE["job_configuration"], {**DEFAULTS, "name": "extract", **values})
    config["job_manifest"]["metadata"].setdefault("labels", {})
    container = pod_spec(config)["containers"][0]
    env = {**config.get("env", {}), **WORKER_ENV}
    container["env"] = [{"name": k, "value": v} for k, v in env.items()] + container["env"]
    container.setdefault("args", WORKER_COMMAND)
    return config


def pod_spec(config: dict) -> dict:
    return config["job_manifest"]["spec"]["template"]["spec"]


def as_sent(config: dict) -> dict:
    """The manifest as the API server keeps it: it drops the two pod-spec fields that only the
    worker's own check wants (a strict schema check would rightly call them unknown)."""
    manifest = copy.deepcopy(config["job_manifest"])
    for field in ("parallelism", "completions"):
        del pod_spec({"job_manifest": manifest})[field]
    return manifest


def test_every_placeholder_is_a_described_variable_with_a_valid_default():
    """The Prefect server refuses a template whose placeholders are not declared variables, and
    a pool whose defaults do not fit their own schema; descriptions are the pool's docs."""
    used = {p.name for p in find_placeholders(json.dumps(TEMPLATE["job_configuration"]))}
    assert used <= set(VARIABLES), used - set(VARIABLES)
    assert [name for name, v in VARIABLES.items() if not v.get("description")] == []
    jsonschema.validate(DEFAULTS, TEMPLATE["variables"])


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "gpus": 4,
            "env": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
            "labels": {"fusellm/stage": "train"},
            "node_selector": {"node.kubernetes.io/instance-type": "p4d.24xlarge"},
            "finished_job_ttl": None,
            "service_account_name": "fusellm",
        },
    ],
    ids=["defaults", "overrides"],
)
def test_rendered_job_is_a_valid_kubernetes_job(values):
    """What the worker sends must pass the Kubernetes schema, with defaults and with a
    deployment's usual overrides, and the worker's own check must accept the manifest."""
    config = render(**values)
    kubernetes_validate.validate(as_sent(config), K8S_VERSION, strict=True)
    patch = jsonpatch.JsonPatch.from_diff(config["job_manifest"], WORKER_REQUIRED)
    assert [op for op in patch if op["op"] in ("add", "replace")] == []


@pytest.mark.parametrize(
    "field, breakage",
    [
        ("containers", {"name": "prefect-job"}),  # an object, not a list
        ("nodeSelecter", {"a": "b"}),  # a misspelled field: caught in strict mode only
    ],
    ids=["containers-not-a-list", "misspelled-field"],
)
def test_schema_check_catches_a_broken_job(field, breakage):
    """The schema check is real: a broken copy of the job fails it."""
    manifest = as_sent(render())
    pod_spec({"job_manifest": manifest})[field] = breakage
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_job_gets_a_whole_gpu_node_and_the_shared_work_folder():
    """A GPU stage uses every GPU its container sees, reads and writes the work folder that
    all stages share, and needs a /dev/shm far larger than the runtime's default for NCCL."""
    spec = pod_spec(render())
    container = spec["containers"][0]
    for kind in ("limits", "requests"):
        assert container["resources"][kind]["nvidia.com/gpu"] == VARIABLES["gpus"]["default"] == 8
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/data/fusellm"]["persistentVolumeClaim"] == {"claimName": "fusellm-work"}
    assert mounts["/dev/shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_job_runs_the_workers_command_once_with_fusellm_home_on_the_volume():
    """The image's entrypoint is `fusellm`: the job replaces it so that the worker's command
    runs as given, and it is never retried by Kubernetes (a retry is Prefect's decision)."""
    config = render()
    container = pod_spec(config)["containers"][0]
    assert container["command"] == ["/usr/bin/env"] and container["args"] == WORKER_COMMAND
    assert container["image"] == "fusellm:cuda" and container["imagePullPolicy"] == "IfNotPresent"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FUSELLM_HOME"] == "/data/fusellm" and env["PREFECT_API_URL"]
    assert pod_spec(config)["restartPolicy"] == "Never"
    assert config["job_manifest"]["spec"]["backoffLimit"] == 0
    assert config["job_manifest"]["spec"]["ttlSecondsAfterFinished"] == 86400
