"""Where runs and data live: local paths and fsspec URLs (s3://, gs://, ...).

Run layout (stable, documented in docs/storage.md):

    <storage>/<job name>/spec.yaml                resolved spec, no secrets
    <storage>/<job name>/metrics.jsonl            one JSON object per report
    <storage>/<job name>/samples/step_XXXXXX.png  sample grids from fixed noise
    <storage>/<job name>/checkpoint_XXXXXX/       Ray Train checkpoints: state.pt, meta.json
    <storage>/<job name>/checkpoint_manager_snapshot.json   Ray's own bookkeeping

Credentials are never taken from a job file: fsspec/botocore read them from the environment,
profiles or instance roles.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import split_protocol

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")


class StorageError(RuntimeError):
    """A storage problem phrased for the user: it names the URL, never a credential."""


def is_remote(url: str) -> bool:
    protocol, _ = split_protocol(url)
    return protocol not in (None, "file", "local")


def filesystem(url: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it for a local path or URL."""
    protocol, path = split_protocol(url)
    if protocol in (None, "file", "local"):
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    kwargs: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        protocol = "s3"
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        # Fail fast on a dead endpoint instead of botocore's long retry ladder.
        kwargs["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60,
                                   "retries": {"max_attempts": 2}}
    try:
        fs = fsspec.filesystem(protocol, **kwargs)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{url}: no filesystem for '{protocol}://' ({e}); "
                           f"install its fsspec package (s3fs, gcsfs, ...)") from None
    return fs, path.rstrip("/")


def pyarrow_filesystem(fs: fsspec.AbstractFileSystem):
    """Ray Train and Ray Data take pyarrow filesystems; fsspec ones plug in through a handler."""
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def explain(url: str, err: BaseException) -> StorageError:
    """Turn a botocore/fsspec exception into one line that names the URL and the cause."""
    text = f"{type(err).__name__}: {err}"
    low = text.lower()
    if isinstance(err, PermissionError) or "invalidaccesskeyid" in low or "signaturedoesnotmatch" in low \
            or "accessdenied" in low or "forbidden" in low or "403" in low:
        why = "access denied: check the credentials in the environment (AWS_ACCESS_KEY_ID/profile)"
    elif "nosuchbucket" in low or "bucket does not exist" in low:
        why = "the bucket does not exist"
    elif "nocredentials" in low or "unable to locate credentials" in low:
        why = "no credentials found in the environment, profile or instance role"
    elif "could not connect" in low or "connect timeout" in low or "connection refused" in low \
            or "endpoint" in low and "connect" in low or "name or service not known" in low:
        why = "the storage endpoint is unreachable"
    elif isinstance(err, FileNotFoundError):
        why = "no such file or directory"
    else:
        why = text.splitlines()[0][:300]
    return StorageError(f"{url}: {why}")


@dataclass
class Store:
    """One location (a storage root or a run) reached through fsspec."""

    url: str
    endpoint_url: str | None = None

    def __post_init__(self):
        self.fs, self.root = filesystem(self.url, self.endpoint_url)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def child(self, name: str) -> "Store":
        return Store(self.url.rstrip("/") + "/" + name, self.endpoint_url)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:  # botocore raises many types; all become one clear line
            raise explain(self.url, e) from None

    def exists(self, *parts: str) -> bool:
        return self._call(self.fs.exists, self.path(*parts))

    def read_text(self, *parts: str) -> str:
        with self._call(self.fs.open, self.path(*parts), "r") as f:
            return f.read()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        target = self.path(*parts)
        if not is_remote(self.url):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        self._call(self.fs.pipe_file, target, data)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def listdir(self, *parts: str) -> list[dict]:
        try:
            return self._call(self.fs.ls, self.path(*parts), detail=True)
        except FileNotFoundError:
            return []

    def check_writable(self) -> None:
        """Probe the location once before a run, so a bad bucket fails in seconds."""
        if not is_remote(self.url):
            os.makedirs(self.root, exist_ok=True)
            return
        probe = self.path(".rayganx_probe")
        try:
            self._call(self.fs.pipe_file, probe, b"ok")
            self._call(self.fs.rm, probe)
        except FileNotFoundError:
            raise StorageError(f"{self.url}: the bucket does not exist") from None


# --------------------------------------------------------------------------- run contents


def read_metrics(run: Store) -> list[dict]:
    try:
        text = run.read_text("metrics.jsonl")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def list_checkpoints(run: Store) -> list[dict]:
    """Checkpoints of a run, oldest first: step, path, time, size and the metrics saved with it."""
    out = []
    for entry in run.listdir():
        name = posixpath.basename(entry["name"].rstrip("/"))
        m = CHECKPOINT_RE.match(name)
        if not m or entry.get("type") != "directory":
            continue
        files = run.listdir(name)
        meta: dict = {}
        if any(posixpath.basename(f["name"]) == "meta.json" for f in files):
            meta = json.loads(run.read_text(name, "meta.json"))
        out.append({
            "step": int(m.group(1)), "name": name, "url": run.url.rstrip("/") + "/" + name,
            "size": sum(f.get("size") or 0 for f in files), "time": meta.get("time"),
            "metrics": meta.get("metrics", {}),
        })
    return sorted(out, key=lambda c: c["step"])


def list_runs(root: Store) -> list[dict]:
    import yaml

    if not root.exists():
        raise StorageError(f"{root.url}: does not exist")
    runs = []
    for entry in root.listdir():
        if entry.get("type") != "directory":
            continue
        name = posixpath.basename(entry["name"].rstrip("/"))
        run = root.child(name)
        if not run.exists("spec.yaml"):
            continue
        spec = yaml.safe_load(run.read_text("spec.yaml")) or {}
        metrics = read_metrics(run)
        last = metrics[-1] if metrics else {}
        runs.append({"name": name, "model": spec.get("model", {}).get("kind", "?"),
                     "step": last.get("step"), "time": last.get("time"), "metrics": last})
    return sorted(runs, key=lambda r: r["name"])


def split_checkpoint_url(url: str) -> tuple[str, str]:
    """(run URL, checkpoint folder name) of a checkpoint URL."""
    url = url.rstrip("/")
    return url.rsplit("/", 1)[0], url.rsplit("/", 1)[1]


def load_state(url: str, endpoint_url: str | None = None, map_location="cpu") -> dict:
    """The state.pt of a checkpoint folder, local or remote (no Ray needed)."""
    import torch

    store = Store(url, endpoint_url)
    target = store.path("state.pt") if not url.endswith(".pt") else store.root
    try:
        with store._call(store.fs.open, target, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise StorageError(f"{url}: not a rayganx checkpoint (no state.pt)") from None


def download(url: str, to: str, endpoint_url: str | None = None, progress=None) -> list[str]:
    """Copy a checkpoint folder to a local directory; `progress(bytes_done, bytes_total)`."""
    store = Store(url, endpoint_url)
    files = [f for f in store._call(store.fs.find, store.root, detail=True).values() if f["type"] == "file"]
    if not files:
        raise StorageError(f"{url}: no such checkpoint")
    total, done, written = sum(f["size"] or 0 for f in files), 0, []
    for f in files:
        rel = posixpath.relpath(f["name"], store.root)
        dest = os.path.join(to, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with store._call(store.fs.open, f["name"], "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
        written.append(dest)
    return written
