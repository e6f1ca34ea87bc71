"""Cluster and container definitions: the launcher config against Ray's own schema, the KubeRay
manifests' structure and security (token auth from a Secret, no public dashboard, no inline
secrets), the compose stack and the Dockerfile, and the local multi-node cluster script."""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_ports
from tests.console_lines import console_problems

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKER = ROOT / "docker"
LOCAL_SCRIPT = CLUSTER / "local-cluster.sh"
# KubeRay's CRDs, beside the checkout (../shared/kuberay; RSK_KUBERAY names another place)
KUBERAY = Path(os.environ.get("RSK_KUBERAY", ROOT.parent / "shared" / "kuberay"))

# Names whose values are secrets: they may only come from a reference, never a literal.
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
SECRET_LITERALS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                      # AWS access key id
    re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),  # AWS secret key shape
    re.compile(r"\b[0-9a-f]{32,}\b"),                     # hex tokens (Ray tokens are 64 hex)
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _no_secret_literals(text: str, where: str) -> None:
    for pattern in SECRET_LITERALS:
        hit = pattern.search(text)
        assert hit is None, f"{where}: looks like a secret literal: {hit.group(0)[:12]}..."


def _walk(node, path=""):
    """(dotted path, dict) for every mapping in a YAML tree."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


# --------------------------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------------------------


def test_launcher_config_matches_rays_schema():
    import jsonschema
    import ray.autoscaler as ray_autoscaler
    schema_path = Path(ray_autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)

    from ray.autoscaler._private.util import validate_config

    validate_config(config)  # the schema plus Ray's own cross-field checks
    # The schema is strict enough to catch a broken config.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "max_workers": "many"}, schema)


def test_launcher_config_is_gpu_and_private():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = {t["node_config"]["InstanceType"] for name, t in types.items() if name != config["head_node_type"]}
    assert gpu_types & {"g5.12xlarge", "g5.48xlarge", "p4d.24xlarge", "p5.48xlarge"}
    assert "rsk-dist" in config["docker"]["image"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    for perm in config["provider"]["security_group"]["IpPermissions"]:
        assert perm["FromPort"] == perm["ToPort"] == 22, "only SSH may be opened"
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in perm["IpRanges"])
    text = (CLUSTER / "ray-cluster.yaml").read_text()
    assert "aws_secret_access_key" not in text.lower() and "AWS_ACCESS_KEY_ID" not in text
    _no_secret_literals(text, "ray-cluster.yaml")


# --------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------


def _ray_specs(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster or RayJob."""
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifest(name, kind):
    path = CLUSTER / "kuberay" / name
    docs = _docs(path)
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
    (doc,) = [d for d in docs if d["kind"] == kind]
    assert doc["apiVersion"] == "ray.io/v1"
    spec = _ray_specs(doc)
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard must not be exposed"

    # Token auth through KubeRay's authOptions: the operator sets the token on every Ray
    # container from the Secret and uses it for its own dashboard calls (job status).
    auth = spec["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"], auth
    assert tuple(int(v) for v in spec["rayVersion"].split(".")[:2]) >= (2, 52)
    for pod in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        for container in _containers(pod):
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(_env(container)), "the operator sets these"
    if kind == "RayJob":  # the submitter is no Ray node: it reads the same Secret itself
        for container in _containers(doc["spec"]["submitterPodTemplate"]):
            env = _env(container)
            assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": auth["secretName"], "key": "auth_token"}, container["name"]

    # GPU workers
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in _containers(g["template"]))]
    assert gpu_groups, "a worker group with nvidia.com/gpu resources"
    for g in gpu_groups:
        for c in _containers(g["template"]):
            res = c["resources"]
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]

    # S3 credentials: IRSA or a Secret reference, never a literal
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for pod in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        sa = pod["spec"].get("serviceAccountName")
        assert sa in accounts and "eks.amazonaws.com/role-arn" in accounts[sa]["metadata"]["annotations"]

    # no inline secrets anywhere: no Secret with data, no env literal for a secret-looking name
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created out of band"
    for where, node in _walk(docs):
        if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
            raise AssertionError(f"{name} {where}: {node['name']} has an inline value")
    _no_secret_literals(path.read_text(), name)

    # services: nothing of type LoadBalancer/NodePort
    for where, node in _walk(docs):
        assert node.get("serviceType") not in ("LoadBalancer", "NodePort"), where
        assert node.get("type") not in ("LoadBalancer", "NodePort"), where


def _strict(schema):
    """A CRD's OpenAPI schema as the API server's strict field validation applies it: an object
    that lists its properties admits no other, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd_schema(kind: str) -> dict:
    """The strict ray.io/v1 schema of ``kind`` from KubeRay's CRD in ../shared/kuberay/."""
    crd = yaml.safe_load((KUBERAY / f"ray.io_{kind.lower()}s.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def _schema_errors(doc: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(_crd_schema(doc["kind"]))
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifest_matches_the_crd_schema(name):
    """Every RayCluster and RayJob in cluster/kuberay/ is valid under KubeRay's own CRD schema,
    strictly: a misspelt field anywhere, in our spec or in a pod template, fails."""
    docs = [d for d in _docs(CLUSTER / "kuberay" / name) if d["kind"] in ("RayCluster", "RayJob")]
    assert docs
    for doc in docs:
        assert _schema_errors(doc) == [], name
        spec = _ray_specs(doc)
        for path, misspelt in (
            (spec["headGroupSpec"], "rayStartParam"),  # rayStartParams
            (spec["headGroupSpec"]["template"]["spec"]["containers"][0], "imagePullPolicyy"),
            (doc["spec"], "entrypointt" if doc["kind"] == "RayJob" else "enableInTreeAutoscalingg"),
        ):
            path[misspelt] = "x"
            errors = _schema_errors(doc)
            del path[misspelt]
            assert any(misspelt in e for e in errors), (misspelt, errors)
        bad = copy.deepcopy(doc)
        _ray_specs(bad)["workerGroupSpecs"][0]["replicas"] = "two"
        assert any("replicas" in e for e in _schema_errors(bad))


def test_rayjob_runs_rsk_dist_train_on_a_valid_config():
    docs = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint.startswith("python -m rsk_dist.cli train ")  # no console script needed
    config_path = entrypoint.split()[4]
    # the config file the entrypoint names is the ConfigMap mounted on the head
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for c in head["containers"] for m in c.get("volumeMounts", [])
                 if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
    text = cm["data"][Path(config_path).name]

    from rsk_dist.config import load_config

    config = load_config(yaml.safe_load(text))
    assert config.scaling.use_gpu
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["replicas"]
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] for c in _containers(g["template"]))
    assert gpus >= config.scaling.num_workers * config.scaling.gpus_per_worker


# --------------------------------------------------------------------------------------------
# Docker
# --------------------------------------------------------------------------------------------


def test_compose_services_and_no_secrets():
    path = DOCKER / "compose.yaml"
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    assert {"ray-head", "ray-worker", "minio", "minio-init"} <= set(services)
    assert "rsk-dist" in services["minio-init"]["command"][0] and "mc mb" in services["minio-init"]["command"][0]
    head_env = services["ray-head"]["environment"]
    assert head_env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert services["ray-worker"]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]

    # published ports: this machine only
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"

    # secrets: a reference to the environment, defaulting at most to an obvious dev placeholder
    for name, service in services.items():
        env = service.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
        for key, value in items:
            if not SECRET_NAME.search(key) or key == "RAY_AUTH_MODE":
                continue
            value = str(value)
            assert value.startswith("${"), f"{name}.{key} is a literal"
            m = re.fullmatch(r"\$\{(\w+)(?::-(.*)|:\?.*)?\}", value)
            assert m, f"{name}.{key}: {value}"
            default = m.group(2)
            if default is not None:
                assert default.startswith("rsk-dev"), f"{name}.{key}: default {default!r} is not a dev placeholder"
    assert ":?" in head_env["RAY_AUTH_TOKEN"], "the Ray token has no default"
    _no_secret_literals(path.read_text(), "compose.yaml")


def test_dockerfile_installs_package_gpu_stack():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM .*nvidia/cuda|^ARG CUDA_IMAGE=nvidia/cuda:12", text, re.M)
    assert "faiss-gpu-cu12" in text
    assert re.search(r'ray\[[^\]]*train[^\]]*\]==\$\{RAY_VERSION\}', text)
    assert re.search(r"pip install \"?/opt/rsk-dist(\[[^\]]*\])?\"?", text), "the package itself is installed"
    assert "COPY rsk_dist" in text and "COPY pyproject.toml" in text
    for word in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID=", "RAY_AUTH_TOKEN="):
        assert word not in text
    _no_secret_literals(text, "Dockerfile")
    m = re.search(r"ARG RAY_VERSION=(\S+)", text)
    import ray
    assert m and m.group(1) == ray.__version__, "the image's Ray should match the submitting Ray"


# --------------------------------------------------------------------------------------------
# local-cluster.sh
# --------------------------------------------------------------------------------------------


def test_local_cluster_script_syntax():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(LOCAL_SCRIPT)], check=True)
    text = LOCAL_SCRIPT.read_text()
    assert "ray stop" not in text.replace("never runs `ray stop`", "").replace("runs `ray stop`", "")
    assert "_private" not in text, "only Ray's public interfaces"
    out = subprocess.run([bash, str(LOCAL_SCRIPT), "bogus"], capture_output=True, text=True)
    assert out.returncode == 1 and "unknown command" in out.stderr


def _processes_naming(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(bool(os.environ.get("RSK_DIST_SKIP_RAY_JOBS")), reason="RSK_DIST_SKIP_RAY_JOBS is set")
def test_local_cluster_runs_the_readme_example_and_stops_clean():
    """A head and one worker node on the loopback address 127.0.0.2; the README's example, a
    two-worker quickstart submitted to it, prints each progress and eval line once with no
    traceback or error-level line, and keeps its checkpoints in ./runs; then `stop`: nothing of
    the cluster is left running, and the checkpoints are still there."""
    directory = tempfile.mkdtemp(prefix="rsk-lc-", dir="/tmp")
    workdir = Path(tempfile.mkdtemp(prefix="rsk-lc-job-"))  # the user's directory: ./runs lands here
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    gcs, dash, client, agent = free_ports(4)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY=str(Path(sys.executable).parent / "ray"), PYTHON=sys.executable,
        RSK_CLUSTER_DIR=directory, RSK_GCS_PORT=str(gcs), RSK_DASHBOARD_PORT=str(dash),
        RSK_CLIENT_PORT=str(client), RSK_AGENT_PORT=str(agent),
        HOME=directory,  # a token generated for this cluster, not the user's ~/.ray/auth_token
        # `stop` SIGTERMs each node's `ray start --block`, which by default first drains its node
        # for up to 30 s (the head's own actors keep it busy to the end): here it stops at once.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    script = ["bash", str(LOCAL_SCRIPT)]
    try:
        started = subprocess.run([*script, "start", "1"], env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "head + 1 worker node(s)" in started.stdout
        assert (Path(directory) / "auth_token").is_file(), "token auth on, with a generated token"
        probe = (
            "import ray; ray.init(address='127.0.0.2:%s', logging_level='ERROR', log_to_driver=False);"
            "nodes = [n for n in ray.nodes() if n['Alive']];"
            "print(len(nodes), sorted(n['NodeManagerAddress'] for n in nodes));"
            "print(sorted(k for n in nodes for k in n['Resources'] if k.startswith('node_')))"
        ) % env["RSK_GCS_PORT"]
        probe_env = {**env, "RAY_AUTH_MODE": "token",
                     "RAY_AUTH_TOKEN_PATH": str(Path(directory) / "auth_token")}
        out = subprocess.run([sys.executable, "-c", probe], env=probe_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = out.stdout.strip().splitlines()
        assert lines[-2] == "2 ['127.0.0.2', '127.0.0.2']", out.stdout
        assert lines[-1] == "['node_0', 'node_1']", out.stdout

        # The README's example, shortened: 1 epoch of 4 steps, a progress line every 2, one eval.
        submit = subprocess.run(
            ["rsk-dist", "submit", str(ROOT / "jobs" / "quickstart.yaml"), "--set", "scaling.num_workers=2",
             "--set", "train.epochs=1", "--set", "train.steps_per_epoch=4", "--set", "train.log_every=2",
             "--address", f"http://127.0.0.1:{dash}"],
            env=probe_env, cwd=workdir, capture_output=True, text=True, timeout=600,
        )
        console = submit.stdout + submit.stderr
        assert submit.returncode == 0, console[-6000:]
        assert console_problems(console, progress_lines=2 + 1) == [], console
        assert f"read on the cluster's nodes as file://{workdir}/runs" in submit.stderr, submit.stderr
    finally:
        stopped = subprocess.run([*script, "stop"], env=env, capture_output=True, text=True, timeout=120)
        leftovers = _processes_naming(directory)
        shutil.rmtree(directory, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    assert leftovers == [], f"processes left running: {leftovers}"
    kept = sorted(p.name for p in (workdir / "runs" / "quickstart").iterdir())
    shutil.rmtree(workdir, ignore_errors=True)
    assert "checkpoint_epoch_00001" in kept and "best" in kept, kept
