"""The Kubernetes Job of a training across nodes (infra/kubernetes/train-job.yaml).

Both objects must pass the Kubernetes schema (strictly: a misspelled field fails), and fit
together as the training needs: an Indexed Job of N pods at once, one per machine, whose pod 0
is reachable by the name the rendezvous endpoint gives through the headless Service; each pod
runs `python -m fusellm.stages.nodes` with its node rank from $JOB_COMPLETION_INDEX, on the
shared work folder. No cluster is needed.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from fusellm.stages.nodes import INDEX_VARIABLE, parser

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "infra" / "kubernetes" / "train-job.yaml"
K8S_VERSION = "1.30.0"  # as tests/test_kubernetes_template.py (backoffLimitPerIndex: beta, on)


def _objects() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def test_every_object_is_valid_kubernetes():
    objects = _objects()
    assert set(objects) == {"Service", "Job"}
    for manifest in objects.values():
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_schema_check_catches_a_misspelled_field():
    job = _objects()["Job"]
    job["spec"]["template"]["spec"]["subdomian"] = "fusellm-train"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_pod_zero_is_the_rendezvous_endpoint_through_the_headless_service():
    objects = _objects()
    service, job = objects["Service"], objects["Job"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2  # every node at once
    assert pod["restartPolicy"] == "Never" and spec["backoffLimitPerIndex"] >= 1
    # Pods of an Indexed Job are named <job>-<index>; with the Service as their subdomain,
    # <job>-0.<service> is pod 0's address.
    assert (
        service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    )
    job_name = job["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job_name}
    assert service["spec"]["publishNotReadyAddresses"] is True
    container = pod["containers"][0]
    args = parser().parse_args(container["args"][3:])
    host, port = args.rendezvous.rsplit(":", 1)
    assert host == f"{job_name}-0.{service['metadata']['name']}" and args.host_node == 0
    assert (
        int(port) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
    )
    assert container["args"][:3] == ["python", "-m", "fusellm.stages.nodes"]
    assert container["command"] == ["/usr/bin/env"]
    assert args.node_rank is None  # from $JOB_COMPLETION_INDEX, which Kubernetes sets
    assert INDEX_VARIABLE == "JOB_COMPLETION_INDEX"
    env = {e["name"]: e for e in container["env"]}
    assert args.local_addr == "$(POD_IP)"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"  # one pod per machine


def test_every_pod_trains_in_the_shared_work_folder_on_a_whole_gpu_node():
    pod = _objects()["Job"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/data/fusellm"]["persistentVolumeClaim"] == {"claimName": "fusellm-work"}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert container["args"][3].startswith("/data/fusellm/")  # the config, on the volume
    for kind in ("limits", "requests"):
        assert container["resources"][kind]["nvidia.com/gpu"] == 8
    assert pod["securityContext"]["runAsUser"] == 10001
