"""Cluster configs: the launcher config against ray's own schema, the runtime_env through ray's RuntimeEnv, and the
Kubernetes manifests' structure (kinds, apiVersions, field names, images, GPU resources, the copies kept equal)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

from ray_render import cli
from ray_render.config import job_from_options, load_config_file

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PROJECT_IMAGE = re.compile(r"ghcr\.io/example/ray-render:\d+\.\d+\.\d+")

# Field names of the KubeRay ray.io/v1 types (ray-operator/apis/ray/v1) and of the core Kubernetes types used here.
# Kubernetes drops unknown fields without a word, so a misspelt field is a silent misconfiguration: catch it here.
RAY_CLUSTER_SPEC = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                    "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
                    "workerGroupSpecs"}
HEAD_GROUP_SPEC = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                   "rayStartParams", "serviceType"}
WORKER_GROUP_SPEC = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                      "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args"}
RAY_JOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
                "shutdownAfterJobFinishes", "suspend"}
RAY_CRON_JOB_SPEC = {"jobTemplate", "schedule", "timeZone", "suspend"}
CRON_JOB_SPEC = {"concurrencyPolicy", "failedJobsHistoryLimit", "jobTemplate", "schedule", "startingDeadlineSeconds",
                 "successfulJobsHistoryLimit", "suspend", "timeZone"}
JOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "backoffLimitPerIndex", "completionMode", "completions",
            "managedBy", "manualSelector", "maxFailedIndexes", "parallelism", "podFailurePolicy",
            "podReplacementPolicy", "selector", "successPolicy", "suspend", "template", "ttlSecondsAfterFinished"}
POD_SPEC = {"activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig",
            "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork",
            "hostPID", "hostUsers", "hostname", "imagePullSecrets", "initContainers", "nodeName", "nodeSelector",
            "os", "overhead", "preemptionPolicy", "priority", "priorityClassName", "readinessGates",
            "resourceClaims", "resources", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates",
            "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace",
            "subdomain", "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints", "volumes"}
CONTAINER = {"args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe", "name",
             "ports", "readinessProbe", "resizePolicy", "resources", "restartPolicy", "securityContext",
             "startupProbe", "stdin", "stdinOnce", "terminationMessagePath", "terminationMessagePolicy", "tty",
             "volumeDevices", "volumeMounts", "workingDir"}


def load(name: str) -> list[dict]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def only(name: str) -> dict:
    [document] = load(name)
    return document


def known(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    assert not unknown, f"{where}: unknown field(s) {unknown}"


def check_pod_template(template: dict, where: str) -> list[dict]:
    known(template, {"metadata", "spec"}, where)
    spec = template["spec"]
    known(spec, POD_SPEC, f"{where}.spec")
    assert spec["containers"], f"{where}: no containers"
    mounted = {volume["name"] for volume in spec.get("volumes", [])}
    for container in spec["containers"]:
        known(container, CONTAINER, f"{where} container {container.get('name')}")
        assert container["name"] and container["image"]
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in mounted, f"{where}: volume {mount['name']} is mounted but not declared"
    return spec["containers"]


def check_ray_cluster_spec(spec: dict, where: str) -> int:
    """The structure a KubeRay RayCluster spec needs, and a GPU worker group sized consistently; returns the most
    GPUs its worker groups may have."""
    known(spec, RAY_CLUSTER_SPEC, where)
    known(spec.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS, f"{where}.autoscalerOptions")
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    known(head, HEAD_GROUP_SPEC, f"{where}.headGroupSpec")
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(value, str) for value in head["rayStartParams"].values())  # map[string]string
    [head_container] = check_pod_template(head["template"], f"{where}.headGroupSpec")
    assert PROJECT_IMAGE.fullmatch(head_container["image"])
    assert {port["containerPort"] for port in head_container["ports"]} >= {6379, 8265, 10001}
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})  # the head needs no GPU

    gpu_groups = most_gpus = 0
    for group in spec["workerGroupSpecs"]:
        where_group = f"{where} worker group {group['groupName']}"
        known(group, WORKER_GROUP_SPEC, where_group)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], f"{where_group}: cannot autoscale"
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())
        [container] = check_pod_template(group["template"], where_group)
        assert container["image"] == head_container["image"], f"{where_group}: head and workers run one image"
        limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
        if "num-gpus" in group["rayStartParams"]:
            gpu_groups += 1
            gpus = int(group["rayStartParams"]["num-gpus"])
            assert gpus >= 1 and int(limits["nvidia.com/gpu"]) == gpus, f"{where_group}: num-gpus != GPU limit"
            most_gpus += gpus * group["maxReplicas"]
            # Extended resources cannot be overcommitted: a request, if given, must equal the limit.
            assert int(requests.get("nvidia.com/gpu", gpus)) == gpus
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{where_group}: GPU taint"
    assert gpu_groups >= 1, f"{where}: no GPU worker group"
    return most_gpus


def check_asks_for_the_gpus(command: list[str], most_gpus: int, where: str) -> None:
    """The job asks for GPU actors up to what the cluster may grow to: `--device cuda` (the head has no GPU, so
    `auto` would find none when the job starts and render on CPU) and `--max-actors` = the most GPUs over the GPUs
    an actor takes. Fewer and the autoscaler is never asked for the rest; more and actors wait for GPUs that can
    never come."""
    subcommand = "refresh" if command[1].endswith("refresh.py") else "run"
    args = cli.build_parser().parse_args([subcommand, *command[2:]])  # only options `ray-render` knows
    options = load_config_file(str(REPO / args.config))
    gpus_per_actor = getattr(args, "gpus_per_actor", options.get("gpus_per_actor", 1.0))
    assert getattr(args, "device", None) == "cuda", f"{where}: no --device cuda"
    assert getattr(args, "max_actors", None) == int(most_gpus / gpus_per_actor), \
        f"{where}: --max-actors is not the {most_gpus} GPUs the cluster may have"
    assert getattr(args, "actors", None) is None, f"{where}: a fixed --actors pool cannot grow"


def check_ray_job_spec(spec: dict, where: str, script: str = "jobs/render.py") -> None:
    known(spec, RAY_JOB_SPEC, where)
    command = shlex.split(spec["entrypoint"])
    assert command[:3] == ["python", script, "--config"], f"{where}: entrypoint {spec['entrypoint']!r}"
    config_path = command[3]
    options = load_config_file(str(REPO / config_path))  # a real job file, with valid option names
    job_from_options(options)
    if "--out" in command:
        assert re.match(r"(s3|gs)://", command[command.index("--out") + 1]), "cluster jobs write to object storage"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # The submitter pod uploads working_dir from its image: the repository copy the Dockerfile makes. Ray checks
    # that a local working_dir exists, so check this file with that copy's source, the repository itself.
    [workdir] = re.findall(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert runtime_env["working_dir"] == workdir, f"{where}: working_dir is not the image's repository copy"
    check_runtime_env({**runtime_env, "working_dir": str(REPO)}, f"{where}.runtimeEnvYAML")
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    assert spec["shutdownAfterJobFinishes"] is True  # GPU nodes go back when the job ends
    most_gpus = check_ray_cluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
    check_asks_for_the_gpus(command, most_gpus, where)


def as_refresh(spec: dict) -> dict:
    """A one-off RayJob spec turned into the scheduled one: the same job, refreshed instead of run again."""
    scheduled = copy.deepcopy(spec)
    scheduled["entrypoint"] = spec["entrypoint"].replace("jobs/render.py", "jobs/refresh.py", 1)
    return scheduled


def check_runtime_env(env: dict, where: str) -> None:
    unknown = sorted(set(env) - set(RuntimeEnv.known_fields))
    assert not unknown, f"{where}: unknown runtime_env field(s) {unknown}"
    RuntimeEnv(**env)  # ray's own type checks (env_vars values must be strings, ...)


def test_launcher_config_passes_rays_schema():
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as handle:
        schema = json.load(handle)
    config = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(config)
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    gpu_types = [name for name, node in node_types.items() if node["resources"].get("GPU", 0) >= 1]
    assert gpu_types and config["head_node_type"] not in gpu_types
    for name in gpu_types:
        assert node_types[name]["min_workers"] == 0 < node_types[name]["max_workers"] <= config["max_workers"]
    assert node_types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    # The job the file's header submits asks for a GPU actor per GPU the workers may have.
    [submit] = re.findall(r"-- (python jobs/render\.py .*?)(?:#|$)", header_command(CLUSTER / "launcher-aws.yaml"))
    most_gpus = sum(node_types[name]["resources"]["GPU"] * node_types[name]["max_workers"] for name in gpu_types)
    check_asks_for_the_gpus(shlex.split(submit), min(most_gpus, config["max_workers"]), "launcher-aws.yaml")
    assert PROJECT_IMAGE.fullmatch(config["docker"]["image"])
    # Token auth: every node starts with it on, and gets the token the client submits with.
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray start" not in command or "RAY_AUTH_MODE=token" in command, command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def header_command(path: Path) -> str:
    """The leading comment of a file as one line: its commands, continuation lines joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines).replace("\\ ", "")


def test_launcher_schema_check_catches_mistakes():
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as handle:
        schema = json.load(handle)
    config = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0  # misspelt
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(broken, schema)


def test_runtime_env_is_one_ray_accepts():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    check_runtime_env(env, "runtime_env.yaml")
    assert ".venv/" in env["excludes"]  # a developer's checkout never uploads its virtualenv


def test_ray_cluster():
    cluster = only("raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["metadata"]["name"]
    check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")


def test_ray_job_runs_the_render_entrypoint_on_the_same_cluster_spec():
    job = only("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    check_ray_job_spec(job["spec"], "rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == only("raycluster.yaml")["spec"], "rayjob.yaml drifted from raycluster"


def test_ray_cron_job_schedules_the_same_job():
    cron = only("raycronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    known(cron["spec"], RAY_CRON_JOB_SPEC, "raycronjob.yaml")
    assert len(cron["spec"]["schedule"].split()) == 5
    check_ray_job_spec(cron["spec"]["jobTemplate"], "raycronjob.yaml jobTemplate", script="jobs/refresh.py")
    assert as_refresh(only("rayjob.yaml")["spec"]) == cron["spec"]["jobTemplate"], "raycronjob.yaml drifted"


def test_kubernetes_cron_job_creates_the_same_ray_job_with_least_privilege():
    documents = {document["kind"]: document for document in load("cronjob.yaml")}
    assert set(documents) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    expected_versions = {"ServiceAccount": "v1", "ConfigMap": "v1", "CronJob": "batch/v1",
                         "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1"}
    assert {kind: d["apiVersion"] for kind, d in documents.items()} == expected_versions

    cron = documents["CronJob"]
    known(cron["spec"], CRON_JOB_SPEC, "CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # two refreshes must not write one output at once
    job_spec = cron["spec"]["jobTemplate"]["spec"]
    known(job_spec, JOB_SPEC, "CronJob jobTemplate")
    pod = job_spec["template"]["spec"]
    [container] = check_pod_template(job_spec["template"], "CronJob pod")
    assert re.fullmatch(r"alpine/k8s:\d+\.\d+\.\d+", container["image"])  # kubectl with a shell, pinned
    assert pod["restartPolicy"] in ("OnFailure", "Never")

    # The pod's account may create RayJobs, and nothing else.
    account = pod["serviceAccountName"]
    assert documents["ServiceAccount"]["metadata"]["name"] == account
    binding = documents["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": documents["Role"]["metadata"]["name"]}
    [rule] = documents["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]
    assert not {"delete", "*", "update", "patch"} & set(rule["verbs"])

    # It creates the RayJob held in the mounted ConfigMap (rayjob.yaml), named after the slot's Job: a retried
    # create of one slot finds it there and makes no second one.
    [volume] = pod["volumes"]
    assert volume["configMap"]["name"] == documents["ConfigMap"]["metadata"]["name"]
    [mount] = container["volumeMounts"]
    [key] = documents["ConfigMap"]["data"]
    [slot] = container["env"]
    assert slot["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert container["command"] == ["sh", "-c"] and f"{mount['mountPath']}/{key}" in container["args"][0]
    ray_job = yaml.safe_load(documents["ConfigMap"]["data"][key])
    reference = only("rayjob.yaml")
    assert ray_job["metadata"]["name"] == "__SLOT__" and "generateName" not in ray_job["metadata"]
    check_ray_job_spec(ray_job["spec"], "cronjob.yaml RayJob", script="jobs/refresh.py")
    assert ray_job["spec"] == as_refresh(reference["spec"]), "cronjob.yaml's RayJob drifted from rayjob.yaml"
    assert (ray_job["apiVersion"], ray_job["kind"]) == ("ray.io/v1", "RayJob")


def test_cron_job_script_creates_one_ray_job_per_slot(tmp_path):
    """The CronJob pod's script, run with a stand-in for kubectl that keeps created objects by name (the API
    server's AlreadyExists): the first try of a slot creates its RayJob, a retry of the slot creates nothing."""
    documents = {document["kind"]: document for document in load("cronjob.yaml")}
    container = documents["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    [key] = documents["ConfigMap"]["data"]
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / key).write_text(documents["ConfigMap"]["data"][key])
    created = tmp_path / "created"
    created.mkdir()
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env python3
        import sys, yaml
        assert sys.argv[1:3] == ["create", "-f"], sys.argv
        name = yaml.safe_load(open(sys.argv[3]))["metadata"]["name"]
        target = "{created}/" + name
        try:
            open(target, "x").write(open(sys.argv[3]).read())
        except FileExistsError:
            sys.exit(f'Error from server (AlreadyExists): rayjobs.ray.io "{{name}}" already exists')
        print(f"rayjob.ray.io/{{name}} created")
        """))
    kubectl.chmod(0o755)
    script = container["args"][0].replace("/tmp/", f"{tmp_path}/").replace("/manifests/", f"{manifests}/")
    env = {**os.environ, "PATH": f"{kubectl.parent}:{sys.executable.rsplit('/', 1)[0]}:{os.environ['PATH']}",
           "SLOT": "ray-render-refresh-29420100"}
    for _ in range(2):  # the slot's first try, then a retry of the same slot
        done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert os.listdir(created) == ["ray-render-refresh-29420100"]
    assert yaml.safe_load((created / "ray-render-refresh-29420100").read_text())["kind"] == "RayJob"
    env["SLOT"] = "ray-render-refresh-29421540"  # the next night's slot: a new RayJob
    assert subprocess.run(["sh", "-c", script], env=env, capture_output=True, timeout=60).returncode == 0
    assert len(os.listdir(created)) == 2


def test_image_is_built_on_the_ray_version_the_manifests_declare():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", base)
    assert match, f"base image {base} is not a Ray GPU image"
    for name in ("raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"):
        text = (CLUSTER / name).read_text()
        assert set(re.findall(r'rayVersion: "([^"]+)"', text)) == {match.group(1)}, name
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which the repository does not have"
    texts = "".join((CLUSTER / name).read_text() for name in os.listdir(CLUSTER) if name.endswith(".yaml"))
    images = set(re.findall(r"^\s*image: (\S+)", texts, flags=re.MULTILINE))
    project_images = {image for image in images if "ray-render" in image}
    assert len(project_images) == 1, f"one project image tag everywhere, got {project_images}"
