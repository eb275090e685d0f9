"""KubeRay manifests: render a RayJob from a job spec, and validate manifests.

Validation uses the CRD schemas of the KubeRay release (see rayganx.ops.crds for where they come
from), made strict (unknown fields rejected), plus the rules KubeRay's controller checks in Go.
Rendering needs no schemas: it checks the controller's rules and, when schemas are at hand,
the schemas too.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import PurePosixPath

import yaml

from rayganx.ops.crds import Schemas
from rayganx.job.errors import UserError
from rayganx.job.cluster import DATA_CPUS
from rayganx.job.config import ENV_REF, SECRET_ENV
from rayganx.job.spec import JobSpec
from rayganx.store.storage import is_remote

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
DEFAULT_SECRET = "rayganx-storage"
JOB_DIR = "/etc/rayganx"


class ManifestError(UserError, ValueError):
    """A manifest problem naming the file, the field and what is wrong."""


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


def validate_doc(doc: dict, where: str = "<manifest>", schemas: Schemas | None = None) -> list[str]:
    """Problems of one manifest document (empty when valid); the CRD schema check needs `schemas`."""
    kind = doc.get("kind")
    problems: list[str] = []
    if kind in ("RayJob", "RayCluster"):
        if doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"{where}: apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}")
        errors = schemas.validator(kind).iter_errors(doc) if schemas else []
        for err in sorted(errors, key=lambda e: list(e.absolute_path)):
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


def validate_file(path, schemas: Schemas | None = None) -> list[str]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ManifestError(f"{path}: {e.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: malformed YAML: {e}") from None
    return [p for i, d in enumerate(docs) for p in validate_doc(d, f"{path}" + (f"[{i}]" if len(docs) > 1 else ""), schemas)]


# --------------------------------------------------------------------------- render


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job file in the ConfigMap) as readable literal blocks, no anchors."""

    def ignore_aliases(self, data):
        return True


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def dump(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


def _container(image: str, cpus: float, gpus: int, memory: str | None, secret: str | None, head: bool,
               env: list[dict], mounts: list[dict]) -> dict:
    limits = {"cpu": f"{float(cpus):g}"} | ({"memory": memory} if memory else {}) | ({"nvidia.com/gpu": gpus} if gpus else {})
    c = {"name": "ray-head" if head else "ray-worker", "image": image,
         "resources": {"limits": limits, "requests": {k: v for k, v in limits.items() if k != "nvidia.com/gpu"}}}
    if head:
        c["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 8080, "name": "metrics"}]
    if env:
        c["env"] = env
    if secret:
        c["envFrom"] = [{"secretRef": {"name": secret}}]
    if mounts:
        c["volumeMounts"] = mounts
    return c


def parse_pvc(text: str) -> tuple[str, str]:
    """--pvc CLAIM:/mount/path"""
    claim, _, mount = text.partition(":")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", claim) or not mount.startswith("/"):
        raise ManifestError(f"--pvc {text!r}: expected CLAIM:/mount/path (a PersistentVolumeClaim name and "
                            f"an absolute mount path)")
    return claim, mount.rstrip("/") or "/"


def _under(path: str, mount: str) -> bool:
    return PurePosixPath(path).is_absolute() and PurePosixPath(path).is_relative_to(mount)


def path_problems(spec: JobSpec, pods: int, pvc: tuple[str, str] | None, storage: str | None = None) -> list[str]:
    """Paths a pod cannot reach: local data, pod-local storage on a cluster of several pods."""
    mount = pvc[1] if pvc else None
    vol = f"a volume every pod mounts (--pvc CLAIM:{mount or '/mnt/data'} with the path under it)"
    out = []
    storage = storage or spec.storage.path
    if not is_remote(storage) and not (mount and _under(storage, mount)):
        out.append(f"storage.path: {storage!r} is pod-local: on a cluster of {pods} pods each pod would keep "
                   f"the checkpoints it wrote and lose them with it; use object storage "
                   f"(--set storage.path=s3://BUCKET/runs) or {vol}")
    for key, value in spec.paths().items():
        if key == "storage.path" or key.startswith("eval.") and not spec.eval.every:
            continue
        if not is_remote(value) and not (mount and _under(value, mount)):
            out.append(f"{key}: {value!r} is a path on this machine, not in the pods; put it in object "
                       f"storage (--set {key}=s3://BUCKET/...) or on {vol}")
    return out


def gpu_layout(s) -> tuple[int, int]:
    """(Train workers per pod, GPUs per pod). Kubernetes hands out whole GPUs: a fraction 1/k puts
    k workers in one pod on one GPU, which Ray then shares among them."""
    if not s.use_gpu:
        return 1, 0
    g = s.gpus_per_worker
    if g >= 1 and g == int(g):
        return 1, int(g)
    k = round(1 / g) if g < 1 else 0
    if k < 2 or not math.isclose(k * g, 1.0, rel_tol=1e-6):
        raise ManifestError(f"scaling.gpus_per_worker: {g:g} cannot be rendered: Kubernetes gives a pod whole "
                            f"GPUs; use a whole number, or 1/k (0.5, 0.25, ...) to run k workers on one GPU")
    return k, 1


def _times(memory: str | None, k: int) -> str | None:
    if not memory or k == 1:
        return memory
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", memory)
    if not m:
        raise ManifestError(f"scaling.memory_per_worker: {memory!r}: expected a Kubernetes quantity such as 8Gi")
    return f"{float(m.group(1)) * k:g}{m.group(2)}"


def pod_env(*specs: JobSpec) -> list[dict]:
    """This machine's values of the variables the job's placeholders name, so the pods resolve the
    ConfigMap's ${VAR} to what was checked here (credential variables never reach a job file)."""
    names = sorted({var for s in specs for t in s._templates.values() for var, _ in ENV_REF.findall(t)})
    return [{"name": n, "value": os.environ[n]} for n in names if n in os.environ and not SECRET_ENV.search(n)]


def _rayjob(name: str, namespace: str, entrypoint: str, files: dict[str, str], s, workers: int, image: str,
            secret: str | None, pvc: tuple[str, str] | None, env: list[dict]) -> list[dict]:
    labels = {"app.kubernetes.io/name": "rayganx", "rayganx/job": name}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-job", "namespace": namespace, "labels": labels}, "data": files}
    per_pod, gpus = gpu_layout(s)
    replicas = math.ceil(workers / per_pod)
    claim = [{"name": "pvc", "mountPath": pvc[1]}] if pvc else []
    claim_vol = [{"name": "pvc", "persistentVolumeClaim": {"claimName": pvc[0]}}] if pvc else []
    # The entrypoint runs on the head: the job file is mounted there from the ConfigMap.
    head = _container(image, 2, 0, "8Gi", secret, True, env, [{"name": "job", "mountPath": JOB_DIR}, *claim])
    # A pod the Train workers fill would starve Ray Data's read and decode tasks.
    worker = _container(image, per_pod * s.cpus_per_worker + DATA_CPUS, gpus, _times(s.memory_per_worker, per_pod), secret,
                        False, env, [{"name": "dshm", "mountPath": "/dev/shm"}, *claim])
    # Ray's object store and NCCL live in /dev/shm, which is 64M in a pod unless given memory.
    pod: dict = {"containers": [worker], "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, *claim_vol]}
    if gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    metrics = {"metrics-export-port": "8080"}
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
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", **metrics},
                    "template": {"spec": {"containers": [head],
                                          "volumes": [{"name": "job", "configMap": {"name": f"{name}-job"}},
                                                      *claim_vol]}}},
                "workerGroupSpecs": [{
                    "groupName": "gpu-workers" if gpus else "cpu-workers",
                    "replicas": replicas, "minReplicas": replicas, "maxReplicas": replicas,
                    "rayStartParams": dict(metrics),
                    "template": {"spec": pod},
                }],
            },
        },
    }
    return [config_map, job]


def _k8s_name(name: str) -> str:
    return re.sub(r"[^a-z0-9.-]", "-", name.lower()).strip("-.")


def render(spec: JobSpec, image: str, namespace: str = "default", secret: str | None = DEFAULT_SECRET,
           pvc: tuple[str, str] | None = None) -> list[dict]:
    """A ConfigMap holding the job exactly as it will run (every --set applied, ${VAR} kept) and a
    RayJob running it on its own KubeRay cluster sized from that same spec."""
    per_pod, _ = gpu_layout(spec.scaling)
    pods = 1 + math.ceil(spec.scaling.max_workers / per_pod)
    problems = path_problems(spec, pods, pvc)
    if problems:
        raise ManifestError("\n".join(problems))
    return _rayjob(_k8s_name(spec.name), namespace, f"rayganx run {JOB_DIR}/job.yaml", {"job.yaml": spec.to_yaml()},
                   spec.scaling, spec.scaling.max_workers, image, secret, pvc, pod_env(spec))


def render_sweep(sweep, image: str, namespace: str = "default", secret: str | None = DEFAULT_SECRET,
                 pvc: tuple[str, str] | None = None, gpu_sets: list[str] | None = None) -> list[dict]:
    """A ConfigMap holding the sweep (its base job inline) and a RayJob running `rayganx tune` on a
    cluster sized for max_concurrent_trials trials at once (2 when unset)."""
    import copy

    from rayganx.job import spec as jobspec
    from rayganx.job.config import parse_overrides, set_dotted

    job = copy.deepcopy(sweep.base_raw)
    for key, value in parse_overrides(gpu_sets):
        set_dotted(job, key, value)
    base = jobspec.from_dict(job, sweep.source)
    trials = sweep.spec.max_concurrent_trials or 2
    workers = trials * sweep.workers_per_trial
    per_pod, _ = gpu_layout(base.scaling)
    problems = path_problems(base, 1 + math.ceil(workers / per_pod), pvc, sweep.storage)
    if problems:
        raise ManifestError("\n".join(problems))
    raw = sweep.spec.model_dump(mode="json", exclude_defaults=True) | {
        "job": job, "space": sweep.spec.space, "max_concurrent_trials": trials}
    return _rayjob(_k8s_name(sweep.spec.name), namespace, f"rayganx tune {JOB_DIR}/sweep.yaml",
                   {"sweep.yaml": yaml.safe_dump(raw, sort_keys=False)}, base.scaling, workers, image, secret, pvc,
                   pod_env(base))
