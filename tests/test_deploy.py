"""Deployment files: the KubeRay manifest, the image and the cluster launcher stay in step with the
production config, and none of them puts state on a shared file path."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from serve_app.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ROOT / "configs" / "wan21-i2v-480p.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


def _pinned_ray_minor() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"ray\[serve\]>=(\d+\.\d+),<', text)
    assert m, "pyproject.toml must pin ray[serve] to a minor version"
    return m.group(1)


def test_rayservice_deploys_the_production_application_with_the_same_args():
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert manifest["kind"] == "RayService"
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == yaml.safe_load(PRODUCTION.read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"].startswith(_pinned_ray_minor() + ".")
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["maxReplicas"] > gpu["minReplicas"] >= 1
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"]
    assert "/opt/wan" in {m["mountPath"] for m in worker["volumeMounts"]}  # node-local caches
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    # Keys and the database URL come from Secrets, in the variables the production config names.
    args = AppConfig.model_validate({**yaml.safe_load(PRODUCTION.read_text())["applications"][0]["args"],
                                     "auth": {"public_by_choice": True}})
    for container in (head, worker):
        from_secrets = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert {"WAN_API_KEYS", args.storage.jobs_db_env} <= from_secrets


def test_image_is_rays_cuda_image_of_the_pinned_version():
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(_pinned_ray_minor())}\.\d+-py\d+-(gpu|cu\d+)", base), base
    assert '".[cloud]"' in dockerfile  # the object-store backends the production config needs
    images = {c["image"] for c in _containers(yaml.safe_load(RAYSERVICE.read_text()))}
    assert len(images) == 1  # head, workers and the checkpoint fetcher run the one image


def _containers(manifest: dict):
    cluster = manifest["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for spec in specs:
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def test_production_state_is_in_postgres_and_object_storage_not_on_a_shared_path():
    config = yaml.safe_load(PRODUCTION.read_text())
    args = config["applications"][0]["args"]
    storage = args["storage"]
    assert storage["outputs_dir"].startswith("s3://")
    assert storage["jobs_db"].startswith("postgresql://") and storage["jobs_db_env"]
    assert "api_keys_file" not in args["auth"] and args["auth"]["api_keys_env"] == "WAN_API_KEYS"
    assert args["ingress"]["num_replicas"] >= 2 and args["ingress"]["max_replicas_per_node"] == 1
    for text in (PRODUCTION.read_text(), RAYSERVICE.read_text(), (ROOT / "cluster.yaml").read_text()):
        body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # comments may explain
        assert "/mnt/shared" not in body and not re.search(r"\b(nfs|efs)\b", body, re.I)
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for target, source in cluster["file_mounts"].items():
        assert not source.startswith("/"), f"{target} comes from an absolute (shared?) path {source}"
    started = " ".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    assert started.count("wan-secrets.env") == 2 and "WAN_JOBS_DB_URL" in started


def test_secrets_file_is_never_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/secrets.env"], cwd=ROOT)
    assert ignored.returncode == 0, "deploy/secrets.env must be git-ignored"
    assert (ROOT / "deploy" / "secrets.env.example").is_file()


def _scraped_names(kind: str, name: str) -> set[str]:
    """The names Ray's Prometheus endpoint shows for a metric (``ray_`` prefix, OpenMetrics suffixes);
    a histogram may also be named by its base name, as the guide's table does."""
    name = "ray_" + name
    if kind == "Counter":
        return {name if name.endswith("_total") else name + "_total"}
    if kind == "Histogram":
        return {name} | {name + suffix for suffix in ("_bucket", "_count", "_sum")}
    return {name}


def _known_metric_names() -> set[str]:
    """Every name ours (built here, without Ray) and Ray Serve's (from its source) are scraped as."""
    import ray
    from ray.util import metrics

    from deployments.metrics import LoraCacheMetrics, ReplicaMetrics
    from serve_app.metrics import JobMetrics

    names = set()
    for holder in (JobMetrics(), ReplicaMetrics(), LoraCacheMetrics("digest")):
        for value in vars(holder).values():
            for metric in value.values() if isinstance(value, dict) else [value]:
                if isinstance(metric, metrics.Metric):
                    kind = next(k for k in ("Counter", "Histogram", "Gauge") if isinstance(metric, getattr(metrics, k)))
                    names |= _scraped_names(kind, metric.info["name"])
    for path in (Path(ray.__file__).parent / "serve").rglob("*.py"):
        for kind, name in re.findall(r'\b(Counter|Gauge|Histogram)\(\s*(?:name=)?"(serve_[a-z_]+)"', path.read_text()):
            names |= _scraped_names(kind, name)
    return names


def test_dashboard_and_operations_guide_query_metrics_that_exist():
    import json

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "wan-i2v.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    exprs += [v["definition"] for v in variables] + [v["query"]["query"] for v in variables]
    assert len(exprs) >= 10 and all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
    guide = (ROOT / "docs" / "operations.md").read_text()
    used = set(re.findall(r"\bray_(?:wan|serve)_[a-z_]+\b", " ".join(exprs) + guide))
    assert used and not used - _known_metric_names()
