"""The cluster definitions, checked offline (``ray up --dry-run`` needs a cloud account): the Ray
cluster launcher's ``cluster.yaml``, KubeRay's ``deploy/rayjob.yaml`` and ``deploy/rayservice.yaml``,
and the Serve config file ``deploy/serve_config.yaml``. What matters: a CPU head,
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


# --------------------------------------------------------------------------- Serve: deploy/serve_config.yaml, deploy/rayservice.yaml


@pytest.fixture(scope="module")
def serve_configs() -> dict[str, tuple[str, dict]]:
    """Both Serve configs as Ray Serve itself reads them (``ServeDeploySchema``): the file for
    ``serve deploy`` and the RayService's ``serveConfigV2``; plus the RayService manifest."""
    from ray.serve.schema import ServeDeploySchema

    text = (REPO / "deploy" / "serve_config.yaml").read_text()
    service_text = (REPO / "deploy" / "rayservice.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(service_text) if d]
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    configs = {"serve_config.yaml": yaml.safe_load(text), "rayservice.yaml": yaml.safe_load(service["spec"]["serveConfigV2"])}
    for config in configs.values():
        ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay submit; raises on an unknown key
    return {"serve_config.yaml": (text, configs["serve_config.yaml"]), "rayservice.yaml": (service_text, configs["rayservice.yaml"]),
            "manifest": (service_text, service)}


def test_serve_configs_name_the_builder_with_its_own_args(serve_configs):
    """The import path resolves to ``app_builder``, whose one parameter takes ``ServeApp``'s fields:
    every arg is one, the checkpoint is given, and the builder makes a Serve application from them
    (the checkpoint need not exist here: only its check is skipped)."""
    import importlib
    import inspect

    from evaluation import serve as serve_module
    from evaluation.serving import ServeApp, app_settings

    for name in ("serve_config.yaml", "rayservice.yaml"):
        (app,) = serve_configs[name][1]["applications"]
        module, attribute = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attribute)
        assert builder is serve_module.app_builder and len(inspect.signature(builder).parameters) == 1
        assert set(app["args"]) <= set(ServeApp.__dataclass_fields__) and "checkpoint" in app["args"], name
        settings = app_settings(app["args"])
        assert isinstance(settings, ServeApp) and settings.gpus_per_replica >= 1
        assert app["route_prefix"] == "/" and app["name"] == serve_module.APP_NAME


def test_the_builder_builds_the_application_the_configs_describe(serve_configs, tmp_path):
    from ray.serve import Application

    from evaluation import serve as serve_module
    from trainers.checkpoint import model_info, save_checkpoint
    from trainers.models import build_model

    save_checkpoint(tmp_path / "ckpt", build_model("resnet18"), model_info({"backbone": "resnet18"}, 32, 0.5, 0.25, 1, {}))
    (app,) = serve_configs["serve_config.yaml"][1]["applications"]
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what `serve deploy` calls

    built = call_user_app_builder_with_args_if_necessary(serve_module.app_builder, {**app["args"], "checkpoint": str(tmp_path / "ckpt")})
    assert isinstance(built, Application)
    deployment = built._bound_deployment
    assert deployment.num_replicas == app["args"]["replicas"]
    assert deployment.ray_actor_options == {"num_cpus": app["args"]["cpus_per_replica"], "num_gpus": app["args"]["gpus_per_replica"]}
    assert deployment.max_ongoing_requests >= app["args"]["max_batch_size"]  # Serve's default (5) would cap the batches


def test_both_serve_configs_run_the_same_application_on_the_checkpoint_their_cluster_trains(serve_configs):
    from cxr.config import from_raw

    (file_app,) = serve_configs["serve_config.yaml"][1]["applications"]
    (service_app,) = serve_configs["rayservice.yaml"][1]["applications"]
    strip = lambda app: {**app, "args": {k: v for k, v in app["args"].items() if k != "checkpoint"}}
    assert strip(file_app) == strip(service_app)
    # the cluster launcher's run (configs/nih-cluster.yaml, with its search) and the RayJob's (no search)
    cluster = from_raw(yaml.safe_load((REPO / "configs" / "nih-cluster.yaml").read_text()), base_dir=REPO / "configs")
    assert file_app["args"]["checkpoint"] == f"{cluster.run.dir}/{'tune' if cluster.tune.enabled else 'train'}/best"
    job_docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "rayjob.yaml").read_text()) if d]
    (config_map,) = [d for d in job_docs if d["kind"] == "ConfigMap"]
    job = from_raw(yaml.safe_load(config_map["data"]["nih.yaml"]), base_dir=Path("/configs"), origin="nih.yaml")
    assert service_app["args"]["checkpoint"] == f"{job.run.dir}/{'tune' if job.tune.enabled else 'train'}/best"


def test_serve_listens_on_loopback_on_a_vm_and_only_inside_kubernetes(serve_configs):
    _, file_config = serve_configs["serve_config.yaml"]
    assert file_config["http_options"]["host"] == "127.0.0.1"  # Serve's default for a config file is 0.0.0.0
    text, service = serve_configs["manifest"]
    assert service["apiVersion"] == "ray.io/v1"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not [k for k, v in walk(service) if v in ("LoadBalancer", "NodePort") or k.endswith(("hostPort", "hostNetwork"))]
    assert service["spec"].get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"  # KubeRay's serve Service
    assert "kubectl port-forward" in text and "authentication" in text
    assert_no_credentials(text, service)
    images = {c["image"] for spec in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in spec["template"]["spec"]["containers"]}
    job = next(d for d in yaml.safe_load_all((REPO / "deploy" / "rayjob.yaml").read_text()) if d and d["kind"] == "RayJob")
    assert images == {c["image"] for c in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]}
    assert cluster["rayVersion"] == job["spec"]["rayClusterSpec"]["rayVersion"]
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["minReplicas"]
               for g in cluster["workerGroupSpecs"])
    (app,) = serve_configs["rayservice.yaml"][1]["applications"]
    assert gpus >= app["args"]["replicas"] * app["args"]["gpus_per_replica"]  # every replica finds its GPU at the minimum size
