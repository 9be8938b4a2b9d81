"""The cluster definitions, checked offline (``ray up --dry-run`` needs a cloud account): the Ray
cluster launcher's ``cluster.yaml`` and KubeRay's ``deploy/rayjob.yaml``. What matters: a CPU head,
GPU workers with sane autoscaling bounds, the project installed on every node, the dashboard / job
port never exposed to the network, and no credentials in either file."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from cxr.config import from_raw

REPO = Path(__file__).resolve().parents[1]
CREDENTIAL_KEYS = re.compile(r"(access_key|secret|token|password|passwd|credential|private_key|api_key)", re.I)


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted key, value) pair in a parsed YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}".lstrip("."), value
            yield from walk(value, f"{path}.{key}".lstrip("."))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def assert_no_credentials(text: str, tree: Any) -> None:
    keys = [k for k, _ in walk(tree) if CREDENTIAL_KEYS.search(k.rsplit(".", 1)[-1])]
    assert keys == [], f"credential-like keys: {keys}"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    assert "BEGIN RSA PRIVATE KEY" not in text and "BEGIN OPENSSH PRIVATE KEY" not in text


@pytest.fixture(scope="module")
def cluster() -> tuple[str, dict]:
    text = (REPO / "cluster.yaml").read_text()
    return text, yaml.safe_load(text)


def test_cluster_has_a_cpu_head_and_single_and_eight_gpu_worker_types(cluster):
    _, c = cluster
    assert c["provider"]["type"] == "aws" and c["provider"]["region"]
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"(p\d|g\d|inf|trn|dl)", head["node_config"]["InstanceType"]), "the head is a GPU instance"
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items() if name != c["head_node_type"]}
    assert 1 in gpus.values() and 8 in gpus.values(), gpus


def test_autoscaling_bounds(cluster):
    _, c = cluster
    assert c["idle_timeout_minutes"] > 0
    for name, t in c["available_node_types"].items():
        if name == c["head_node_type"]:
            continue
        assert 0 <= t["min_workers"] <= t["max_workers"] <= c["max_workers"], name


def test_setup_installs_this_project_from_its_file_mount(cluster):
    _, c = cluster
    (target,) = [remote for remote, local in c["file_mounts"].items() if local == "."]
    installs = [cmd for cmd in c["setup_commands"] if "pip install" in cmd and target in cmd]
    assert installs and any(" -e " in cmd for cmd in installs)
    assert ".venv" in c["rsync_exclude"] and "runs" in c["rsync_exclude"]


def test_every_node_mounts_the_shared_storage_the_cluster_config_uses(cluster):
    _, c = cluster
    config = from_raw(yaml.safe_load((REPO / "configs" / "nih-cluster.yaml").read_text()), base_dir=REPO / "configs")
    (mount,) = [cmd for cmd in c["setup_commands"] if "mount -t nfs4" in cmd]
    mount_point = mount.split(":/ ", 1)[1].split(")")[0].strip()
    for path in (config.run.dir, config.data.csv, config.data.images):
        assert path.startswith(mount_point + "/"), path


def test_dashboard_and_job_port_stay_on_the_head_loopback(cluster):
    text, c = cluster
    (start,) = [cmd for cmd in c["head_start_ray_commands"] if "ray start --head" in cmd]
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in text
    assert "security_group" not in c["provider"] or all(
        rule["FromPort"] == rule["ToPort"] == 22 for rule in c["provider"]["security_group"].get("IpPermissions", []))
    assert "ray dashboard cluster.yaml" in text  # the file says how to reach them (SSH tunnel)


def test_cluster_yaml_holds_no_credentials(cluster):
    text, c = cluster
    assert_no_credentials(text, c)
    assert "ssh_private_key" not in c["auth"] and "KeyName" not in text


@pytest.fixture(scope="module")
def rayjob() -> tuple[str, dict, list[dict]]:
    text = (REPO / "deploy" / "rayjob.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return text, job, docs


def test_rayjob_runs_the_same_entrypoint_and_cleans_up(rayjob):
    _, job, docs = rayjob
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("cxr run /configs/")
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["GX_ANALYTICS_ENABLED"] == "false"
    # the config the entrypoint names is in the ConfigMap mounted at /configs, and it is valid
    name = spec["entrypoint"].split("/configs/", 1)[1].split()[0]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    mounts = [v for v in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert mounts[0]["configMap"]["name"] == config_map["metadata"]["name"]
    config = from_raw(yaml.safe_load(config_map["data"][name]), base_dir=Path("/configs"), origin=name)
    assert config.train.config.gpus_per_worker >= 1


def test_rayjob_has_a_cpu_head_and_an_autoscaled_gpu_group(rayjob):
    _, job, _ = rayjob
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_resources.get("limits", {}) and head["rayStartParams"].get("num-gpus") == "0"
    groups = cluster["workerGroupSpecs"]
    gpu_groups = [g for g in groups if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert cluster["enableInTreeAutoscaling"] is True
    images = {c["image"] for spec in [head, *groups] for c in spec["template"]["spec"]["containers"]}
    assert len(images) == 1
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"rayproject/ray:{cluster['rayVersion']}-" in dockerfile and "pip install" in dockerfile


def test_rayjob_exposes_no_port_outside_the_cluster(rayjob):
    text, job, docs = rayjob
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not [d for d in docs if d["kind"] in ("Ingress", "Service", "Route", "Gateway")]
    assert not [k for k, v in walk(docs) if v in ("LoadBalancer", "NodePort") or k.endswith(("hostPort", "hostNetwork"))]
    assert "kubectl port-forward" in text
    assert_no_credentials(text, docs)


def test_the_docs_page_says_how_to_reach_the_dashboard():
    page = (REPO / "docs" / "cluster.md").read_text()
    for needle in ("ray dashboard cluster.yaml", "kubectl port-forward", "cxr submit", "cxr jobs", "report.html", "results.md"):
        assert needle in page, needle
