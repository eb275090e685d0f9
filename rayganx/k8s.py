"""KubeRay manifests: render a RayJob from a job spec, and validate manifests offline.

Validation uses the KubeRay v1.7.0 CRD schemas (found through RAYGANX_KUBERAY_CRDS, or the
project's ../shared/kuberay/), made strict the way kubeconform's openapi2jsonschema does
(unknown fields rejected), plus the rules KubeRay's controller checks in Go.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import yaml

from rayganx.spec import JobSpec

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
# Environment variables that hold credentials: they must come from a Secret, never a literal.
SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)$", re.I)
DEFAULT_SECRET = "rayganx-storage"


class ManifestError(ValueError):
    """A manifest problem naming the file, the field and what is wrong."""


def crd_dirs() -> list[Path]:
    env = os.environ.get("RAYGANX_KUBERAY_CRDS")
    here = Path(__file__).resolve().parent.parent
    return ([Path(env)] if env else []) + [here.parent / "shared" / "kuberay", Path.cwd().parent / "shared" / "kuberay"]


def find_crds() -> Path | None:
    for d in crd_dirs():
        if (d / "ray.io_rayjobs.yaml").is_file() and (d / "ray.io_rayclusters.yaml").is_file():
            return d
    return None


def _strict(schema):
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for v in schema.values():
            _strict(v)
    elif isinstance(schema, list):
        for v in schema:
            _strict(v)
    return schema


@functools.lru_cache(maxsize=None)
def validator(kind: str):
    from jsonschema import Draft7Validator

    where = find_crds()
    if where is None:
        raise ManifestError("KubeRay CRD schemas not found (looked in "
                            + ", ".join(str(d) for d in crd_dirs()) + "); set RAYGANX_KUBERAY_CRDS")
    crd = yaml.safe_load((where / f"ray.io_{kind.lower()}s.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return Draft7Validator(_strict(schema))


def _path(err) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "(root)"


def _env_problems(doc, where: str) -> list[str]:
    """Literal values for credential variables anywhere in the document."""
    out = []

    def walk(node, path):
        if isinstance(node, dict):
            if "name" in node and "value" in node and SECRET_ENV.search(str(node["name"])) and "valueFrom" not in node:
                out.append(f"{where}: {path}: {node['name']} has an inline value; reference a Secret "
                           f"(valueFrom.secretKeyRef or envFrom.secretRef)")
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}.{i}")

    walk(doc, "")
    runtime_env = (doc.get("spec") or {}).get("runtimeEnvYAML")
    if runtime_env:
        env_vars = (yaml.safe_load(runtime_env) or {}).get("env_vars", {})
        for k in env_vars:
            if SECRET_ENV.search(k):
                out.append(f"{where}: spec.runtimeEnvYAML.env_vars.{k}: credentials must not be inlined")
    return out


def validate_doc(doc: dict, where: str = "<manifest>") -> list[str]:
    """Problems of one manifest document (empty when valid)."""
    kind = doc.get("kind")
    problems: list[str] = []
    if kind in ("RayJob", "RayCluster"):
        if doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"{where}: apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}")
        for err in sorted(validator(kind).iter_errors(doc), key=lambda e: list(e.absolute_path)):
            msg = err.message
            if err.validator == "additionalProperties":
                msg = "unknown field " + msg.split("(")[-1].rstrip(")").replace(" was unexpected", "")
            problems.append(f"{where}: {_path(err)}: {msg}")
    if kind == "RayJob":
        spec = doc.get("spec") or {}
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            problems.append(f"{where}: spec: set exactly one of rayClusterSpec and clusterSelector")
        if "ttlSecondsAfterFinished" in spec and not spec.get("shutdownAfterJobFinishes"):
            problems.append(f"{where}: spec.ttlSecondsAfterFinished: only valid with shutdownAfterJobFinishes: true")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            problems.append(f"{where}: spec.submissionMode: expected one of {', '.join(SUBMISSION_MODES)}, got {mode!r}")
    if kind == "Secret" and "example" not in str((doc.get("metadata") or {}).get("name", "")):
        for k, v in {**(doc.get("stringData") or {}), **(doc.get("data") or {})}.items():
            if v and "REPLACE" not in str(v):
                problems.append(f"{where}: stringData.{k}: a real credential in a file; create the Secret "
                                f"with kubectl instead (only placeholder examples belong in the repository)")
    problems += _env_problems(doc, where)
    return problems


def validate_file(path: str | Path) -> list[str]:
    text = Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: malformed YAML: {e}") from None
    return [p for i, d in enumerate(docs) for p in validate_doc(d, f"{path}" + (f"[{i}]" if len(docs) > 1 else ""))]


# --------------------------------------------------------------------------- render


def _container(image: str, cpus: float, gpus: float, memory: str | None, secret: str | None, head: bool) -> dict:
    limits = {"cpu": str(cpus)} | ({"memory": memory} if memory else {}) | ({"nvidia.com/gpu": int(gpus)} if gpus else {})
    c = {"name": "ray-head" if head else "ray-worker", "image": image,
         "resources": {"limits": limits, "requests": {k: v for k, v in limits.items() if k != "nvidia.com/gpu"}}}
    if head:
        c["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 8080, "name": "metrics"}]
    if secret:
        c["envFrom"] = [{"secretRef": {"name": secret}}]
    return c


def render(spec: JobSpec, job_file: str, image: str, namespace: str = "default", gpus_per_worker: float | None = None,
           secret: str | None = DEFAULT_SECRET) -> list[dict]:
    """A ConfigMap holding the job file and a RayJob running it on its own KubeRay cluster."""
    s = spec.scaling
    gpus = gpus_per_worker if gpus_per_worker is not None else (s.gpus_per_worker if s.use_gpu else 0)
    sets = ["scaling.use_gpu=true", f"scaling.gpus_per_worker={gpus:g}"] if gpus else []
    name = spec.name.replace("_", "-").lower()
    labels = {"app.kubernetes.io/name": "rayganx", "rayganx/job": name}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-job", "namespace": namespace, "labels": labels},
                  "data": {"job.yaml": Path(job_file).read_text()}}
    head = _container(image, 2, 0, "8Gi", secret, head=True)
    # The entrypoint runs on the head: the job file is mounted there from the ConfigMap.
    head["volumeMounts"] = [{"name": "job", "mountPath": "/etc/rayganx"}]
    worker = _container(image, s.cpus_per_worker, gpus, s.memory_per_worker, secret, head=False)
    pod: dict = {"containers": [worker]}
    if gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    job = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "entrypoint": " ".join(["rayganx", "run", "/etc/rayganx/job.yaml"] + [f"--set {x}" for x in sets]),
            "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
            "activeDeadlineSeconds": 7 * 24 * 3600, "backoffLimit": 2, "submissionMode": "K8sJobMode",
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {"spec": {"containers": [head],
                                          "volumes": [{"name": "job", "configMap": {"name": f"{name}-job"}}]}}},
                "workerGroupSpecs": [{
                    "groupName": "gpu-workers" if gpus else "cpu-workers",
                    "replicas": s.num_workers, "minReplicas": s.num_workers, "maxReplicas": s.num_workers,
                    "rayStartParams": {},
                    "template": {"spec": pod},
                }],
            },
        },
    }
    return [config_map, job]
