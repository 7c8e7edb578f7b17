"""Deployment files, each checked by the tool (or the schema) that consumes it: the cluster launcher YAML by
Ray's own validate_config, the KubeRay manifests by the vendored RayService CRD and kustomize's schema, the
image's pins against pyproject.toml; and all of them kept in step with the production config, without
state on a shared file path or secrets where they do not belong."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from serve_app.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ROOT / "configs" / "wan21-i2v-480p.yaml"
KUBERAY = ROOT / "deploy" / "kuberay"
RAYSERVICE = KUBERAY / "rayservice.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
SCHEMAS = Path(__file__).parent / "schemas"
# Every cluster launcher YAML in the tree (cluster.yaml serves the 1-, 2- and 4-GPU Serve configs alike).
LAUNCHERS = sorted(ROOT.glob("cluster*.yaml")) + sorted((ROOT / "deploy").rglob("cluster*.yaml"))


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pinned_ray_minor() -> str:
    (spec,) = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("ray[serve]")]
    m = re.fullmatch(r"ray\[serve\]>=(\d+\.\d+),<\d+\.\d+", spec)
    assert m, "pyproject.toml must pin ray[serve] to a minor version"
    return m.group(1)


def _production() -> dict:
    return yaml.safe_load(PRODUCTION.read_text())


def _production_args(**overrides) -> dict:
    return {**_production()["applications"][0]["args"], **overrides}


# --- the cluster launcher -------------------------------------------------------------------------------

def test_launchers_are_found():
    assert ROOT / "cluster.yaml" in LAUNCHERS


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_passes_rays_own_validate_config(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    # What `ray up` does before it talks to AWS: defaults filled in, Docker checked, then the schema.
    validate_config(prepare_config(copy.deepcopy(raw)))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_can_launch_what_the_production_config_needs(path):
    config = yaml.safe_load(path.read_text())
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    ingress = _production_args()["ingress"]
    # The ingress replica that docs/operations.md keeps on the head needs CPUs there.
    assert head["resources"].get("CPU", 0) >= ingress["num_cpus"]
    # One launcher for the 1-, 2- and 4-GPU Serve configs: a replica's GPUs are on one node.
    for serve_config in sorted((ROOT / "configs").glob("wan21-i2v-480p*.yaml")):
        gpu = yaml.safe_load(serve_config.read_text())["applications"][0]["args"]["gpu"]
        parallel = gpu.get("parallel", {"degree": 1})
        fits = [n for n in workers if n.get("resources", {}).get("GPU", 0) >= parallel["degree"]]
        assert fits, f"no worker node type holds a replica of {serve_config.name}"
        if "gpus_per_node" in parallel:
            assert {n["resources"]["GPU"] for n in fits} == {parallel["gpus_per_node"]}, serve_config.name
    # Ray's defaults are replaced, not inherited: no nightly-Ray pip install, boto3 checked on the head
    # (Ray's AWS node provider imports it there; the image carries it).
    assert "setup_commands" in config and "head_setup_commands" in config
    assert any("import boto3" in c for c in config["head_setup_commands"])
    # One image, and a GPU AMI; the head and the workers have profiles of their own, and nodes land in the
    # subnets and security group named (pg_hba of the dev database follows that VPC).
    assert config["docker"]["image"] and "--gpus all" in config["docker"]["worker_run_options"]
    profiles = set()
    for node in nodes.values():
        node_config = node["node_config"]
        assert node_config["SubnetIds"] and node_config["SecurityGroupIds"]
        profiles.add(json.dumps(node_config["IamInstanceProfile"], sort_keys=True))
    assert len(profiles) == 2
    commands = json.dumps({k: v for k, v in config.items() if k.endswith("_commands")})
    assert "huggingface-cli" not in commands and "hf download" in commands
    # The jobs database is not on the head's root disk: nothing installs PostgreSQL there.
    assert "postgresql" not in commands.lower()
    # Ray starts through wan-env on every node (the secrets' only way onto a node), with token auth from it.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert "wan-env --secret-id" in start.split("ray start")[0]


def test_cluster_yaml_bootstraps_and_launches_its_nodes_on_the_ec2_api(s3_server, monkeypatch, tmp_path):
    """What `ray up` does on AWS, against moto's EC2/IAM (the suite's S3 server answers every service):
    Ray's AWS bootstrap resolves the profiles, subnets and security group cluster.yaml names, then its node
    provider launches a head and a GPU worker with them. Only the ids of this account's VPC, subnet,
    security group and AMI stand in for the placeholders; the profile ARNs are the file's own (moto's
    account is 123456789012)."""
    import boto3
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": s3_server.endpoint, "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)  # HOME: Ray writes the SSH key it creates under ~/.ssh
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # and its resolved-config cache in the temp dir
    ec2, iam = boto3.client("ec2", region_name="us-east-1"), boto3.client("iam")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    # `ray up` reaches the nodes over SSH at public IPs (use_internal_ips is off): Ray refuses a subnet
    # that does not give them, as deploy/aws/README.md says.
    ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": True})
    group = ec2.create_security_group(GroupName=f"wan-i2v-{os.urandom(3).hex()}", Description="test", VpcId=vpc)["GroupId"]
    trust = (ROOT / "deploy" / "aws" / "trust-policy.json").read_text()
    for role in ("head", "worker"):
        iam.create_role(RoleName=f"wan-i2v-{role}", AssumeRolePolicyDocument=trust)
        iam.put_role_policy(RoleName=f"wan-i2v-{role}", PolicyName=f"wan-i2v-{role}",
                            PolicyDocument=(ROOT / "deploy" / "aws" / f"{role}-policy.json").read_text())
        iam.create_instance_profile(InstanceProfileName=f"wan-i2v-{role}")
        iam.add_role_to_instance_profile(InstanceProfileName=f"wan-i2v-{role}", RoleName=f"wan-i2v-{role}")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    text = (ROOT / "cluster.yaml").read_text()
    for placeholder, real in (("ami-0123456789abcdef0", ami), ("subnet-0123456789abcdef0", subnet),
                              ("sg-0123456789abcdef0", group)):
        assert placeholder in text
        text = text.replace(placeholder, real)

    config = _bootstrap_config(yaml.safe_load(text), no_config_cache=True)
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    for node_type, node in config["available_node_types"].items():
        kind = "head" if node_type == config["head_node_type"] else "worker"
        provider.create_node(node["node_config"], {TAG_RAY_NODE_KIND: kind, TAG_RAY_USER_NODE_TYPE: node_type,
                                                   TAG_RAY_NODE_NAME: node_type}, 1)
    launched = {}
    for reservation in ec2.describe_instances(Filters=[{"Name": "subnet-id", "Values": [subnet]}])["Reservations"]:
        for instance in reservation["Instances"]:
            launched[instance["InstanceType"]] = (instance["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1],
                                                  [g["GroupId"] for g in instance["SecurityGroups"]])
    assert launched == {"m7i.4xlarge": ("wan-i2v-head", [group]), "p5.48xlarge": ("wan-i2v-worker", [group])}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_never_copies_the_secrets_file(path):
    config = yaml.safe_load(path.read_text())
    assert not any("secrets.env" in source for source in config.get("file_mounts", {}).values())
    excluded = set(config.get("rsync_exclude", []))
    assert {"deploy/secrets.env", ".git", ".venv", "outputs"} <= excluded
    assert ".gitignore" in config.get("rsync_filter", [])  # and whatever else git ignores


def test_aws_policies_grant_what_the_autoscaler_and_the_nodes_use():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    nodes = config["available_node_types"]

    def actions(name):
        policy = json.loads((ROOT / "deploy" / "aws" / f"{name}-policy.json").read_text())
        return {a for st in policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}, policy

    head, head_policy = actions("head")
    worker, _ = actions("worker")
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags",
            "iam:PassRole"} <= head
    assert not any(a.startswith(("ec2:", "iam:")) for a in worker)  # workers launch nothing
    for both in (head, worker):
        assert {"s3:GetObject", "s3:PutObject", "secretsmanager:GetSecretValue", "ecr:BatchGetImage"} <= both
    # PassRole only for the role the workers get.
    (worker_profile,) = {n["node_config"]["IamInstanceProfile"]["Arn"] for name, n in nodes.items()
                         if name != config["head_node_type"]}
    (pass_role,) = [st for st in head_policy["Statement"] if "iam:PassRole" in st["Action"]]
    assert worker_profile in pass_role["Resource"]
    assert all(r.rsplit("/", 1)[1] == worker_profile.rsplit("/", 1)[1] for r in pass_role["Resource"])
    bucket = _production_args()["storage"]["outputs_dir"].split("/")[2]
    assert bucket in json.dumps(head_policy)


def test_scripts_parse_and_put_no_password_on_a_command_line():
    script = ROOT / "deploy" / "aws" / "head-postgres.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    for text in (script.read_text(), (ROOT / "cluster.yaml").read_text()):
        for line in text.splitlines():
            if "psql" in line and "PASSWORD" in line.upper():
                assert " -c" not in line, line  # passwords go to psql on stdin (a here-doc)


# --- the image and the pins ------------------------------------------------------------------------------

def _dockerfile() -> str:
    """The Dockerfile's instructions, comments left out (they may explain what is not done)."""
    return "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#"))


def _extra_pins(extra: str) -> dict[str, str]:
    pins = {}
    for spec in _pyproject()["project"]["optional-dependencies"][extra]:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^,;\s]+)", spec)
        assert m, f"[{extra}] must pin exact versions: {spec}"
        pins[m.group(1).lower()] = m.group(2)
    return pins


def test_image_is_rays_exact_cuda_image_of_the_pinned_ray_and_a_supported_python():
    (base,) = re.findall(r"^FROM\s+(\S+)", _dockerfile(), re.M)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+)\.\d+-py3(\d+)-cu\d{3}", base)
    assert m, f"{base}: an exact Ray version, Python and CUDA tag (not the moving -gpu alias)"
    assert m.group(1) == _pinned_ray_minor()
    required = re.fullmatch(r">=3\.(\d+)", _pyproject()["project"]["requires-python"])
    assert required and int(m.group(2)) >= int(required.group(1))
    cluster_ray = yaml.safe_load(RAYSERVICE.read_text())["spec"]["rayClusterConfig"]["rayVersion"]
    assert base.split(":")[1].startswith(cluster_ray + "-")


def test_image_pins_equal_pyprojects_and_the_benchmarked_stack():
    dockerfile = _dockerfile()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile, re.M))
    cuda = _extra_pins("cuda")
    assert args["TORCH_VERSION"] == cuda["torch"]
    # torch from its CUDA index first, then the extras that pin torch/torchao and bring FA4 and boto3.
    assert 'pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in dockerfile
    installed = re.search(r'pip install --no-cache-dir "\.\[([a-z0-9,]+)\]"', dockerfile)
    assert installed and {"cloud", "cuda", "fa4"} <= set(installed.group(1).split(","))
    assert _extra_pins("fa4")  # FlashAttention-4's beta, exact
    assert any(d.startswith("boto3") for d in _pyproject()["project"]["optional-dependencies"]["cloud"])
    assert "huggingface-cli" not in dockerfile and "hf version" in dockerfile
    # The pins are what the GPU benchmarks ran (each result records its torch build).
    cuda_tag = args["TORCH_INDEX"].rstrip("/").rsplit("/", 1)[1]
    results = [json.loads(p.read_text()) for p in (ROOT / "benchmarks" / "gpu_results").glob("*.json")]
    ran = {r["env"]["torch"] for r in results if "torch" in r.get("env", {})}
    assert ran == {f"{cuda['torch']}+{cuda_tag}"}
    assert f"torchao=={cuda['torchao']}" in (ROOT / "benchmarks" / "README.md").read_text()


def test_the_images_import_check_names_our_modules_where_they_are():
    """The build's ``python -c "import ..."`` check names modules that exist (a module moved into a room
    would otherwise fail the image build, long after the move)."""
    names = re.search(r'python -c "import ([^"]+)"', _dockerfile()).group(1).split(", ")
    ours = [n for n in names if n.split(".")[0] in ("serve_app", "deployments")]
    assert "deployments.engine.pipeline" in ours
    missing = [n for n in ours if not (ROOT.joinpath(*n.split(".")).with_suffix(".py").is_file()
                                       or ROOT.joinpath(*n.split("."), "__init__.py").is_file())]
    assert missing == []


def test_one_image_everywhere():
    launcher_image = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"]
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert launcher_image == f"{image['newName']}:{image['newTag']}"
    assert image["newTag"] == _pyproject()["project"]["version"]
    rendered = _render_kustomization(KUBERAY)
    images = {c["image"] for doc in rendered if doc["kind"] == "RayService" for c in _containers(doc)}
    assert images == {launcher_image}  # head, workers and the checkpoint fetcher run the one image


# --- KubeRay ---------------------------------------------------------------------------------------------

def _strict(schema):
    """An openAPIV3Schema with unknown fields refused (what `kubectl apply --validate=strict` does): every
    object that lists its properties gets additionalProperties false unless it preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _rayservice_schema() -> dict:
    crd = yaml.safe_load((SCHEMAS / "ray.io_rayservices.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def _render_kustomization(directory: Path) -> list[dict]:
    """The objects `kubectl apply -k` sends: the resources, with the images: entries applied to every
    container and init container (kustomize's image transformer does the same for custom resources)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in kustomization.get("images", [])}
    docs = [d for r in kustomization["resources"] for d in yaml.safe_load_all((directory / r).read_text()) if d]

    def walk(node):
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                for c in node.get(key, []) if isinstance(node.get(key), list) else []:
                    name = re.split(r"[:@]", c.get("image", ""), maxsplit=1)[0]
                    if name in images:
                        c["image"] = f"{images[name].get('newName', name)}:{images[name]['newTag']}"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs)
    return docs


def _containers(manifest: dict):
    for spec in _pod_specs(manifest):
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def _pod_specs(manifest: dict):
    cluster = manifest["spec"]["rayClusterConfig"]
    yield cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["template"]["spec"]


def _rayservices() -> list[dict]:
    return [d for d in _render_kustomization(KUBERAY) if d["kind"] == "RayService"]


def _kuberay_rules(manifest: dict) -> list[str]:
    """What KubeRay v1.7.0's ValidateRayServiceSpec refuses beyond the schema (ray-operator/controllers/
    ray/utils/validation.go), for the fields these manifests use."""
    errors = []
    spec, cluster = manifest["spec"], manifest["spec"]["rayClusterConfig"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"]):
        errors.append("name is not a DNS-1035 label")
    if spec.get("upgradeStrategy", {}).get("type") not in (None, "NewCluster", "None", "NewClusterWithIncrementalUpgrade"):
        errors.append("upgradeStrategy.type")
    if spec.get("upgradeStrategy", {}).get("type") == "NewClusterWithIncrementalUpgrade" and not \
            spec["upgradeStrategy"].get("clusterUpgradeOptions", {}).get("gatewayClassName"):
        errors.append("NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions")
    head_env = {e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
    if cluster.get("autoscalerOptions", {}).get("version") and "RAY_enable_autoscaler_v2" in head_env:
        errors.append("both autoscalerOptions.version and RAY_enable_autoscaler_v2")
    if cluster.get("autoscalerOptions", {}).get("version") == "v2":
        for pod in _pod_specs(manifest):
            if pod.get("restartPolicy", "Never") != "Never":
                errors.append("restartPolicy must be Never or unset with autoscaler v2")
    auth = cluster.get("authOptions", {})
    if auth.get("mode") == "token":
        version = tuple(int(x) for x in cluster.get("rayVersion", "0").split(".")[:3])
        if version < (2, 52, 0):
            errors.append("token auth needs Ray >= 2.52.0")
    if auth.get("enableK8sTokenAuth"):
        errors.append("K8s token auth is not supported for RayService")
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for group in groups:
        params = group.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            errors.append("resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append("rayStartParams labels")
    for group in cluster["workerGroupSpecs"]:
        if group.get("minReplicas", 0) > group.get("maxReplicas", 2**31):
            errors.append(f"{group['groupName']}: minReplicas > maxReplicas")
    return errors


def test_kuberay_manifests_validate_against_the_vendored_crd_with_unknown_fields_refused():
    schema = _rayservice_schema()
    rayservices = _rayservices()
    assert rayservices
    for manifest in rayservices:
        jsonschema.validate(manifest, schema)
        assert _kuberay_rules(manifest) == []
        # Fields KubeRay stopped reading (ray-project/kuberay#1685) but still lists in the CRD.
        assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & set(manifest["spec"])


def test_strict_schema_refuses_an_unknown_field():
    # The check above can fail: a misspelled or dropped field anywhere in the tree is refused.
    manifest = _rayservices()[0]
    broken = copy.deepcopy(manifest)
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
        jsonschema.validate(broken, _rayservice_schema())


def test_kustomization_and_service_account_validate():
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    jsonschema.validate(kustomization, json.loads((SCHEMAS / "kustomization.json").read_text()))
    for resource in kustomization["resources"]:
        assert (KUBERAY / resource).is_file(), resource
    # Every .yaml beside it is one of its resources (nothing is left for `kubectl apply -f` alone).
    assert {p.name for p in KUBERAY.glob("*.yaml")} - {"kustomization.yaml"} == set(kustomization["resources"])
    rendered = _render_kustomization(KUBERAY)
    accounts = [d for d in rendered if d["kind"] == "ServiceAccount"]
    # core/v1 ServiceAccount: its fields (Kubernetes API reference), unknown ones refused.
    service_account = {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata"],
        "properties": {
            "apiVersion": {"const": "v1"}, "kind": {"const": "ServiceAccount"},
            "automountServiceAccountToken": {"type": "boolean"},
            "imagePullSecrets": {"type": "array"}, "secrets": {"type": "array"},
            "metadata": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        },
    }
    for account in accounts:
        jsonschema.validate(account, service_account)
        assert "eks.amazonaws.com/role-arn" in account["metadata"].get("annotations", {})  # the IRSA slot
    named = {spec.get("serviceAccountName") for manifest in _rayservices() for spec in _pod_specs(manifest)}
    assert named and named <= {a["metadata"]["name"] for a in accounts}


def test_rayservice_deploys_the_production_application_with_the_same_args():
    for manifest in _rayservices():
        assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == _production()
        cluster = manifest["spec"]["rayClusterConfig"]
        assert cluster["rayVersion"].startswith(_pinned_ray_minor() + ".")
        assert cluster["enableInTreeAutoscaling"] is True
        assert cluster["autoscalerOptions"]["version"] == "v2"
        assert cluster["authOptions"]["mode"] == "token" and cluster["authOptions"]["secretName"]
        assert manifest["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "None", "NewClusterWithIncrementalUpgrade")
        (gpu,) = cluster["workerGroupSpecs"]
        assert gpu["maxReplicas"] > gpu["minReplicas"] >= 1
        worker = gpu["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"]
        assert "/opt/wan" in {m["mountPath"] for m in worker["volumeMounts"]}  # node-local caches
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        # Keys and the database URL come from Secrets, in the variables the production config names.
        args = AppConfig.model_validate(_production_args(auth={"public_by_choice": True}))
        for container in (head, worker):
            from_secrets = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
            assert {"WAN_API_KEYS", args.storage.jobs_db_env} <= from_secrets


def _quantity_gi(value: str) -> float:
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(value))
    assert m, value
    return float(m.group(1)) * (units[m.group(2)] if m.group(2) else 2**-30)


def test_rayservice_secrets_are_the_variables_of_the_secrets_file():
    # `kubectl create secret generic wan-i2v-secrets --from-env-file=deploy/secrets.env` must provide them.
    names = set(_wan_env().parse_env((ROOT / "deploy" / "secrets.env.example").read_text()))
    names |= set(re.findall(r"^# ([A-Z_]+)=", (ROOT / "deploy" / "secrets.env.example").read_text(), re.M))
    for manifest in _rayservices():
        for c in _containers(manifest):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] == "wan-i2v-secrets":
                    assert ref["key"] == e["name"] and ref["key"] in names, e


def test_rayservice_pods_drain_get_disk_and_only_the_secrets_they_use():
    drain_s = _production_args()["gpu"]["replica"]["graceful_shutdown_timeout_s"]
    for manifest in _rayservices():
        for spec in _pod_specs(manifest):
            # Kubernetes kills a pod this long after asking it to stop: a running job must fit.
            assert spec["terminationGracePeriodSeconds"] >= drain_s
            disk = sum(_quantity_gi(v["emptyDir"].get("sizeLimit", "0")) for v in spec.get("volumes", [])
                       if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
            requested = sum(_quantity_gi(c.get("resources", {}).get("requests", {}).get("ephemeral-storage", "0"))
                            for c in spec["containers"])
            assert requested >= disk
            for init in spec.get("initContainers", []):
                # The checkpoint fetcher gets the hub token and nothing else.
                assert [e["name"] for e in init.get("env", [])] in ([], ["HF_TOKEN"])
                assert init["command"][:2] == ["hf", "download"]
            for c in spec["containers"]:
                pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
                if pre_stop:
                    assert int(pre_stop[-1]) < spec["terminationGracePeriodSeconds"]
        gpu_spec = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
        assert gpu_spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1].endswith("drain_node.py")


def test_production_state_is_in_postgres_and_object_storage_not_on_a_shared_path():
    config = _production()
    args = config["applications"][0]["args"]
    storage = args["storage"]
    assert storage["outputs_dir"].startswith("s3://")
    assert storage["jobs_db"].startswith("postgresql://") and storage["jobs_db_env"]
    assert "api_keys_file" not in args["auth"] and args["auth"]["api_keys_env"] == "WAN_API_KEYS"
    assert args["ingress"]["num_replicas"] >= 2 and args["ingress"]["max_replicas_per_node"] == 1
    for path in [PRODUCTION, *KUBERAY.glob("*.yaml"), *LAUNCHERS]:
        body = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())  # comments may explain
        assert "/mnt/shared" not in body and not re.search(r"\b(nfs|efs)\b", body, re.I), path
    for launcher in LAUNCHERS:
        for target, source in yaml.safe_load(launcher.read_text())["file_mounts"].items():
            assert not source.startswith("/"), f"{target} comes from an absolute (shared?) path {source}"


# --- secrets ---------------------------------------------------------------------------------------------

def test_secrets_file_is_never_committed_nor_built_into_the_image():
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/secrets.env"], cwd=ROOT)
    assert ignored.returncode == 0, "deploy/secrets.env must be git-ignored"
    assert (ROOT / "deploy" / "secrets.env.example").is_file()
    assert "deploy/secrets.env" in (ROOT / ".dockerignore").read_text().splitlines()


def _deploy_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wan_env():
    return _deploy_script("wan_env")


def test_drain_hook_calls_ray_drain_node_as_the_installed_ray_parses_it():
    import click
    from ray.scripts.scripts import drain_node

    command = _deploy_script("drain_node").drain_command("ab" * 28, 600)
    assert command[:2] == ["ray", "drain-node"]
    drain_node.make_context("drain-node", command[2:])  # unknown options or reasons raise here
    with pytest.raises(click.UsageError):
        drain_node.make_context("drain-node", [*command[2:], "--reason", "DRAIN_NODE_REASON_NAP"])


def test_wan_env_reads_the_secrets_file_format():
    wan_env = _wan_env()
    assert wan_env.parse_env("# c\n\nA=1\nexport B='two words'\nC=\"x=y\"\n") == {"A": "1", "B": "two words", "C": "x=y"}
    with pytest.raises(ValueError, match="line 2") as e:
        wan_env.parse_env("A=1\nnot a line hunter2\n")
    assert "hunter2" not in str(e.value)  # never echo a line that may hold a secret
    example = wan_env.parse_env((ROOT / "deploy" / "secrets.env.example").read_text())
    assert {"WAN_API_KEYS", "WAN_JOBS_DB_URL", "PGPASSWORD", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= set(example)
    from serve_app import config

    assert wan_env.PLACEHOLDER_PREFIX == config.PLACEHOLDER_PREFIX


def _run_wan_env(s3_server, secret_text: str, command: list[str]):
    import boto3

    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_ENDPOINT_URL": s3_server.endpoint}
    name = f"wan-i2v/test-{os.urandom(4).hex()}"
    boto3.client("secretsmanager", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").create_secret(Name=name, SecretString=secret_text)
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "wan_env.py"), "--secret-id", name,
                           "--region", "us-east-1", "--", *command],
                          env=env, capture_output=True, text=True, timeout=120)


def test_wan_env_starts_the_command_with_the_secret_in_its_environment(s3_server):
    # moto's server answers Secrets Manager as well as S3.
    done = _run_wan_env(s3_server, "WAN_API_KEYS=k1,k2\nRAY_AUTH_TOKEN=abc\n",
                        [sys.executable, "-c", "import os; print(os.environ['WAN_API_KEYS'], os.environ['RAY_AUTH_TOKEN'])"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["k1,k2", "abc"]


def test_wan_env_refuses_the_examples_placeholders(s3_server):
    done = _run_wan_env(s3_server, (ROOT / "deploy" / "secrets.env.example").read_text(),
                        [sys.executable, "-c", "print('started')"])
    assert done.returncode != 0 and "started" not in done.stdout
    assert "PGPASSWORD" in done.stderr and "WAN_API_KEYS" in done.stderr and "placeholder" in done.stderr


@pytest.mark.parametrize("env, what", [
    ({"WAN_API_KEYS": "change-me-key-1,a-real-key-0123456789"}, "API key #1 is still"),
    ({"WAN_API_KEYS": "a-real-key-0123456789", "WAN_JOBS_DB_URL": "postgresql://wan:change-me@db:5432/wan"},
     "the job database password is still"),
    ({"WAN_API_KEYS": "a-real-key-0123456789", "PGPASSWORD": "change-me"}, "the job database password is still"),
])
def test_production_config_refuses_the_examples_placeholders_at_startup(monkeypatch, env, what):
    from serve_app.app import build_app

    for name in ("WAN_API_KEYS", "WAN_JOBS_DB_URL", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=what) as e:
        build_app(_production_args())
    assert "deploy/secrets.env.example" in str(e.value)


def test_production_config_starts_with_real_secrets(monkeypatch):
    monkeypatch.setenv("WAN_API_KEYS", "a-real-key-0123456789")
    monkeypatch.setenv("WAN_JOBS_DB_URL", "postgresql://wan:s3cret-Pa55@db:5432/wan")
    monkeypatch.setenv("PGPASSWORD", "another-real-one")
    cfg = AppConfig.model_validate(_production_args())
    assert cfg.auth.load_keys() == ["a-real-key-0123456789"]


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

    from deployments.replica.metrics import LoraCacheMetrics, ReplicaMetrics
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
