"""KubeRay manifests: render a RayJob from a job spec, and validate manifests offline.

Validation uses the KubeRay v1.7.0 CRD schemas (found through RAYGANX_KUBERAY_CRDS, or the
project's ../shared/kuberay/), made strict the way kubeconform's openapi2jsonschema does
(unknown fields rejected), plus the rules KubeRay's controller checks in Go.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import yaml

from rayganx.spec import SECRET_ENV, JobSpec

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
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


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc.get("spec") or {}
    prefix = "spec"
    if doc.get("kind") == "RayJob":
        out = [("spec.submitterPodTemplate", spec["submitterPodTemplate"])] if "submitterPodTemplate" in spec else []
        spec, prefix = spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec"
    else:
        out = []
    if isinstance(spec.get("headGroupSpec"), dict) and "template" in spec["headGroupSpec"]:
        out.append((f"{prefix}.headGroupSpec.template", spec["headGroupSpec"]["template"]))
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        if isinstance(group, dict) and "template" in group:
            out.append((f"{prefix}.workerGroupSpecs.{i}.template", group["template"]))
    return out


def pod_problems(doc: dict, where: str) -> list[str]:
    """The pod templates (containers, resources, env, volumes) against the Kubernetes core schema.

    The KubeRay CRDs leave pod templates loosely typed; kubernetes-validate ships the upstream
    OpenAPI schemas, so a misspelt container field or a wrong resource type is caught offline."""
    try:
        import kubernetes_validate as kv
    except ImportError:
        return []
    out = []
    for path, template in _pod_templates(doc):
        if not isinstance(template, dict):
            continue
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template"}, "spec": template.get("spec")}
        try:
            kv.validate(pod, kv.latest_version(), strict=True)
        except kv.ValidationError as e:
            field = ".".join(str(p) for p in e.path)
            msg = e.message
            if "Additional properties" in msg:
                msg = "unknown field " + msg.split("(")[-1].rstrip(")").replace(" was unexpected", "")
            out.append(f"{where}: {path}.{field}: {msg} (Kubernetes {kv.latest_version()} Pod schema)")
    return out


def core_schema_available() -> bool:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        return False
    return True


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
        problems += pod_problems(doc, where)
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


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job file in the ConfigMap) as readable literal blocks."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def dump(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


def _container(image: str, cpus: float, gpus: float, memory: str | None, secret: str | None, head: bool) -> dict:
    limits = {"cpu": f"{float(cpus):g}"} | ({"memory": memory} if memory else {}) | ({"nvidia.com/gpu": int(gpus)} if gpus else {})
    c = {"name": "ray-head" if head else "ray-worker", "image": image,
         "resources": {"limits": limits, "requests": {k: v for k, v in limits.items() if k != "nvidia.com/gpu"}}}
    if head:
        c["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 8080, "name": "metrics"}]
    if secret:
        c["envFrom"] = [{"secretRef": {"name": secret}}]
    return c


def _rayjob(name: str, namespace: str, entrypoint: str, files: dict[str, str], s, replicas: int, image: str,
            gpus: float, secret: str | None) -> list[dict]:
    labels = {"app.kubernetes.io/name": "rayganx", "rayganx/job": name}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-job", "namespace": namespace, "labels": labels}, "data": files}
    head = _container(image, 2, 0, "8Gi", secret, head=True)
    # The entrypoint runs on the head: the job file is mounted there from the ConfigMap.
    head["volumeMounts"] = [{"name": "job", "mountPath": "/etc/rayganx"}]
    # One CPU per pod beyond the Train worker's: Ray Data's read and decode tasks need a whole
    # free CPU, and a pod the worker fills would starve the input pipeline.
    worker = _container(image, f"{s.cpus_per_worker + 1:g}", gpus, s.memory_per_worker, secret, head=False)
    pod: dict = {"containers": [worker]}
    if gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    job = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "entrypoint": entrypoint,
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
                    "replicas": replicas, "minReplicas": replicas, "maxReplicas": replicas,
                    "rayStartParams": {},
                    "template": {"spec": pod},
                }],
            },
        },
    }
    return [config_map, job]


def _gpu_sets(s, gpus_per_worker: float | None) -> tuple[float, list[str]]:
    gpus = gpus_per_worker if gpus_per_worker is not None else (s.gpus_per_worker if s.use_gpu else 0)
    return gpus, ([f"--set scaling.use_gpu=true --set scaling.gpus_per_worker={gpus:g}"] if gpus else [])


def render(spec: JobSpec, job_file: str, image: str, namespace: str = "default", gpus_per_worker: float | None = None,
           secret: str | None = DEFAULT_SECRET) -> list[dict]:
    """A ConfigMap holding the job file and a RayJob running it on its own KubeRay cluster."""
    gpus, sets = _gpu_sets(spec.scaling, gpus_per_worker)
    return _rayjob(spec.name.replace("_", "-").lower(), namespace,
                   " ".join(["rayganx", "run", "/etc/rayganx/job.yaml", *sets]),
                   {"job.yaml": Path(job_file).read_text()}, spec.scaling, spec.scaling.num_workers, image, gpus, secret)


def render_sweep(sweep, image: str, namespace: str = "default", gpus_per_worker: float | None = None,
                 secret: str | None = DEFAULT_SECRET) -> list[dict]:
    """A ConfigMap holding the sweep (its base job inline) and a RayJob running `rayganx tune` on a
    cluster sized for max_concurrent_trials trials at once (2 when unset)."""
    import copy

    s = sweep.base.scaling
    trials = sweep.spec.max_concurrent_trials or 2
    job = copy.deepcopy(sweep.base_raw)
    gpus, sets = _gpu_sets(s, gpus_per_worker)
    if sets:
        job.setdefault("scaling", {}).update(use_gpu=True, gpus_per_worker=gpus)
    raw = sweep.spec.model_dump(mode="json", exclude_defaults=True) | {
        "job": job, "space": sweep.spec.space, "max_concurrent_trials": trials}
    return _rayjob(sweep.spec.name.replace("_", "-").lower(), namespace, "rayganx tune /etc/rayganx/sweep.yaml",
                   {"sweep.yaml": yaml.safe_dump(raw, sort_keys=False)}, s, trials * sweep.workers_per_trial,
                   image, gpus, secret)
