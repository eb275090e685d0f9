"""Where the KubeRay CRD schemas come from, and the cluster's own validation through kubectl.

The package ships no schemas: they belong to the KubeRay release a cluster runs. They are found
in this order: a directory given on the command line, RAYGANX_KUBERAY_CRDS, the cluster of the
current kube context, a per-user cache filled by `rayganx k8s crds --from`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rayganx.job.errors import UserError

KUBERAY_VERSION = "1.7.0"  # the release whose RayJob/RayCluster fields rayganx renders
CRD_NAMES = {"rayjobs.ray.io": "RayJob", "rayclusters.ray.io": "RayCluster"}
RELEASE_URL = (f"https://raw.githubusercontent.com/ray-project/kuberay/v{KUBERAY_VERSION}/"
               "ray-operator/config/crd/bases/ray.io_rayjobs.yaml")
ENV = "RAYGANX_KUBERAY_CRDS"
EXIT_NO_SCHEMAS = 3  # distinct from 1 (invalid manifest or bad input)


class CrdError(UserError, ValueError):
    """A schema source that was named but cannot be used."""


class SchemasMissing(CrdError):
    """No source of schemas at all; the CLI exits with EXIT_NO_SCHEMAS."""

    exit_code = EXIT_NO_SCHEMAS


@dataclass
class Schemas:
    crds: dict[str, dict]  # kind -> CustomResourceDefinition
    source: str
    _validators: dict = field(default_factory=dict)

    def validator(self, kind: str):
        if kind not in self._validators:
            from jsonschema import Draft7Validator

            crd = self.crds[kind]
            version = next((v for v in crd["spec"]["versions"] if v["name"] == "v1"), None)
            if version is None:
                raise CrdError(f"{self.source}: the {kind} CRD has no v1 version")
            self._validators[kind] = Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
        return self._validators[kind]


def _strict(schema):
    """Unknown fields rejected, as kubeconform's openapi2jsonschema does."""
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


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rayganx" / "kuberay"


def _crds_in(docs) -> dict[str, dict]:
    out = {}
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List":
            out |= _crds_in(d.get("items") or [])
        elif isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition":
            kind = CRD_NAMES.get((d.get("metadata") or {}).get("name"))
            if kind:
                out[kind] = d
    return out


# libyaml's safe loader where PyYAML has it: the two CRDs are 2.3 MB of YAML, 8 s to parse in pure
# Python on this machine, about 1 s in C (same documents). Same safe constructor either way.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse(text: str, where: str) -> dict[str, dict]:
    try:
        return _crds_in(yaml.load_all(text, Loader=_SAFE_LOADER))
    except yaml.YAMLError as e:
        raise CrdError(f"{where}: malformed YAML: {str(e).splitlines()[0]}") from None


def from_dir(path: str | Path) -> Schemas:
    """The RayJob and RayCluster CRDs among the YAML/JSON files of a directory (or one file)."""
    p = Path(path)
    if not p.exists():
        raise CrdError(f"{p}: no such file or directory")
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
    crds: dict[str, dict] = {}
    for f in files:
        crds |= _parse(f.read_text(), str(f))
    missing = sorted(set(CRD_NAMES.values()) - set(crds))
    if missing:
        raise CrdError(f"{p}: no {' or '.join(missing)} CustomResourceDefinition there "
                       f"(expected the CRDs {', '.join(CRD_NAMES)})")
    return Schemas(crds, str(p))


def kubectl_context() -> str | None:
    """The current kube context, when kubectl is installed and one is set."""
    if not shutil.which("kubectl"):
        return None
    try:
        r = subprocess.run(["kubectl", "config", "current-context"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def from_cluster(context: str) -> Schemas:
    try:
        r = subprocess.run(["kubectl", "--context", context, "get", "crd", *CRD_NAMES, "-o", "json"],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise CrdError(f"kube context {context}: kubectl get crd timed out") from None
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or ["kubectl failed"])[0]
        raise CrdError(f"kube context {context}: {first}")
    crds = _crds_in([json.loads(r.stdout)])
    if len(crds) < len(CRD_NAMES):
        raise CrdError(f"kube context {context}: KubeRay's CRDs are not installed")
    return Schemas(crds, f"the cluster of kube context {context}")


def find(crds_dir: str | None = None) -> Schemas:
    """The schemas from the first source that has them; SchemasMissing naming what was tried."""
    if crds_dir:
        return from_dir(crds_dir)
    if os.environ.get(ENV):
        try:
            return from_dir(os.environ[ENV])
        except CrdError as e:
            raise CrdError(f"{ENV}: {e}") from None
    tried = ["--crds DIR (not given)", f"{ENV} (unset)"]
    context = kubectl_context()
    if context:
        try:
            return from_cluster(context)
        except CrdError as e:
            tried.append(str(e))
    else:
        tried.append("kubectl: " + ("no current context" if shutil.which("kubectl") else "not installed"))
    cached = cache_dir()
    if cached.is_dir() and any(cached.iterdir()):
        return from_dir(cached)
    tried.append(f"cache {cached} (empty)")
    raise SchemasMissing(
        "no KubeRay CRD schemas to validate against (tried: " + "; ".join(tried) + "). Get them once with "
        f"`rayganx k8s crds --from URL_OR_FILE` (the KubeRay v{KUBERAY_VERSION} CRDs, e.g. {RELEASE_URL} "
        "and ray.io_rayclusters.yaml beside it, or the crds/ folder of the kuberay-operator Helm chart), "
        f"pass --crds DIR, set {ENV}, or use a kube context whose cluster runs KubeRay")


def fetch(sources: list[str]) -> tuple[Path, list[str]]:
    """Copy the RayJob/RayCluster CRDs from files, directories or URLs into the per-user cache."""
    crds: dict[str, dict] = {}
    for src in sources:
        if src.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(src, timeout=60) as resp:  # noqa: S310 (the user's URL)
                    crds |= _parse(resp.read().decode(), src)
            except OSError as e:
                raise CrdError(f"{src}: cannot download ({e})") from None
        else:
            p = Path(src)
            if not p.exists():
                raise CrdError(f"{src}: no such file or directory")
            for f in ([p] if p.is_file() else sorted(p.rglob("*.y*ml"))):
                crds |= _parse(f.read_text(), str(f))
    if not crds:
        raise CrdError(f"{', '.join(sources)}: no RayJob or RayCluster CustomResourceDefinition found")
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for kind, crd in crds.items():
        (dest / f"ray.io_{kind.lower()}s.yaml").write_text(yaml.safe_dump(crd, sort_keys=False))
    return dest, sorted(crds)


def server_dry_run(path: str) -> list[str]:
    """The API server's own validation of a manifest file (kubectl apply --dry-run=server)."""
    context = kubectl_context()
    if not context:
        raise CrdError("--server: needs kubectl and a current kube context "
                       + ("(none set)" if shutil.which("kubectl") else "(kubectl not installed)"))
    try:
        r = subprocess.run(["kubectl", "apply", "--dry-run=server", "-f", path], capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
        return [f"{path}: kubectl apply --dry-run=server timed out"]
    if r.returncode == 0:
        return []
    return [f"{path}: {line}" for line in r.stderr.strip().splitlines() if line.strip()] or \
        [f"{path}: kubectl apply --dry-run=server failed"]
