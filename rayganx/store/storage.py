"""Where runs and data live: local paths and fsspec URLs (s3://, gs://, ...), the filesystems
Ray reads and writes them through, and errors phrased for the user.

What a run keeps in its store, and how it is read and written whole, is `rayganx.store.runs`.
Credentials are never taken from a job file: fsspec/botocore read them from the environment,
profiles or instance roles.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import posixpath
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import split_protocol

from rayganx.job.errors import UserError

log = logging.getLogger("rayganx")


def _umask() -> int:
    """The process's umask, read once (os.umask can only be read by setting it, which races threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()


class StorageError(UserError, RuntimeError):
    """A storage problem phrased for the user: it names the URL, never a credential."""


class VersionConflict(Exception):
    """A conditional write lost: the object is no longer at the version it was read at."""


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _precondition_failed(e: BaseException) -> bool:
    """S3's 412 (a conditional write or delete lost), through s3fs's and botocore's wrapping."""
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
        if err is not None and "PreconditionFailed" in str(err):
            return True
    return False


def unsafe_key(rel: str) -> str | None:
    """Why a relative key or name would not stay inside the folder it is joined to (None: it
    would). Object stores accept any key, `..` segments and absolute-looking ones included; a
    shared bucket is not trusted to hold only names rayganx wrote."""
    if not rel:
        return "an empty name"
    if rel.startswith("/") or rel.startswith("\\") or (len(rel) > 1 and rel[1] == ":"):
        return "an absolute path"
    if any(ord(ch) < 32 or ch == "\x7f" for ch in rel):
        return "a control character"
    if any(seg in ("..", ".") for seg in rel.replace("\\", "/").split("/")):
        return "a '..' or '.' segment"
    return None


def contained(rel: str, where: str) -> str:
    """`rel` when it stays inside its destination; else one line naming the key."""
    why = unsafe_key(rel)
    if why:
        raise StorageError(f"{where}: refused the key {rel!r}: {why} would write or read outside the destination")
    return rel


def relative_key(name: str, root: str) -> str:
    """A listed object's key below `root`, as stored (no normalisation: `a/../b` stays itself)."""
    root = root.rstrip("/")
    return name[len(root) + 1:] if name.startswith(root + "/") else name


def is_remote(url: str) -> bool:
    protocol, _ = split_protocol(url)
    return protocol not in (None, "file", "local")


def absolute(url: str) -> str:
    """A local path made absolute (~ expanded); a URL as it is."""
    return url if is_remote(url) else os.path.abspath(os.path.expanduser(url))


def filesystem(url: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it for a local path or URL."""
    protocol, path = split_protocol(url)
    if protocol in (None, "file", "local"):
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    kwargs: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        protocol = "s3"
        endpoint = s3_endpoint(endpoint_url)
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


def s3_endpoint(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


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
    elif "could not connect" in low or "couldn't connect" in low or "connect timeout" in low \
            or "connection refused" in low or "network_connection" in low \
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
        """A location inside this one: parts that would lead outside it are refused."""
        for part in parts:
            contained(part, self.url)
        return posixpath.join(self.root, *parts) if parts else self.root

    def child(self, name: str) -> "Store":
        return Store(self.url.rstrip("/") + "/" + name, self.endpoint_url)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError):
            raise
        except Exception as e:  # botocore raises many types; all become one clear line
            raise explain(self.url, e) from None

    def exists(self, *parts: str) -> bool:
        return self._call(self.fs.exists, self.path(*parts))

    def read_text(self, *parts: str) -> str:
        with self._call(self.fs.open, self.path(*parts), "r") as f:
            return f.read()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Whole-file writes: a reader sees the old file or the new one, never half of one.
        (An object store's PUT is atomic; on a local disk the file is renamed into place.)"""
        target = self.path(*parts)
        if is_remote(self.url):
            self._call(self.fs.pipe_file, target, data)
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=os.path.dirname(target))
        try:
            os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's 0600 would keep others (and sidecars) out
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read_bytes(self, *parts: str) -> bytes:
        with self._call(self.fs.open, self.path(*parts), "rb") as f:
            return f.read()

    def remove(self, *parts: str) -> None:
        try:
            self._call(self.fs.rm, self.path(*parts))
        except FileNotFoundError:
            pass

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def listdir(self, *parts: str) -> list[dict]:
        # refresh: fsspec's object-store clients cache listings per process, and other
        # processes (the workers) write into the run while this one reads it.
        try:
            return self._call(self.fs.ls, self.path(*parts), detail=True, refresh=True)
        except FileNotFoundError:
            return []

    def find(self, *parts: str) -> dict:
        self.fs.invalidate_cache(self.path(*parts))
        return self._call(self.fs.find, self.path(*parts), detail=True)

    # ------------------------------------------------------------------ atomic operations (the run lock)
    # A version names one written state of an object: S3's ETag, a local file's content hash. Where the
    # store has no conditional write, `atomic` is False and these fall back to read-compare-write.

    @property
    def atomic(self) -> bool:
        protocol = split_protocol(self.url)[0]
        return protocol in (None, "file", "local", "s3", "s3a")

    def read_versioned(self, *parts: str) -> tuple[bytes, str]:
        """An object's bytes and version (FileNotFoundError when absent)."""
        target = self.path(*parts)
        if not is_remote(self.url):
            with open(target, "rb") as f:
                data = f.read()
            return data, _digest(data)
        if self._s3:
            # The version first: were the object rewritten between the two reads, the bytes are newer
            # than the version, and a conditional write with it fails (the safe way round).
            self.fs.invalidate_cache(target)
            etag = self._call(self.fs.info, target)["ETag"]
            return self._call(self.fs.cat_file, target), etag
        data = self.read_bytes(*parts)
        return data, _digest(data)

    def create(self, data: bytes, *parts: str) -> str:
        """Write an object that must not exist yet (FileExistsError when it does); its version."""
        target = self.path(*parts)
        if not is_remote(self.url):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = self._local_tmp(data, target)
            try:
                os.link(tmp, target)  # atomic, and fails when the name exists: the whole file or nothing
            finally:
                os.unlink(tmp)
            return _digest(data)
        if self._s3:  # If-None-Match: *
            return self._call(self.fs.call_s3, "put_object", Body=data, IfNoneMatch="*", **self._s3_key(target))["ETag"]
        if self.exists(*parts):
            raise FileExistsError(target)
        self.write_bytes(data, *parts)
        return _digest(data)

    def replace(self, data: bytes, version: str, *parts: str) -> str:
        """Overwrite an object only while it is still at `version` (VersionConflict otherwise, or
        FileNotFoundError when it is gone); its new version."""
        target = self.path(*parts)
        if not is_remote(self.url):
            import fcntl

            mutex_path = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.mutex")
            with open(mutex_path, "a") as mutex:  # read-compare-replace under an exclusive flock
                fcntl.flock(mutex, fcntl.LOCK_EX)
                with open(target, "rb") as f:
                    if _digest(f.read()) != version:
                        raise VersionConflict(target)
                os.replace(self._local_tmp(data, target), target)
            return _digest(data)
        if self._s3:  # If-Match: <ETag>
            try:
                return self.fs.call_s3("put_object", Body=data, IfMatch=version, **self._s3_key(target))["ETag"]
            except Exception as e:
                if _precondition_failed(e):
                    raise VersionConflict(target) from None
                if isinstance(e, FileNotFoundError):
                    raise
                raise explain(self.url, e) from None
        data_now, current = self.read_versioned(*parts)
        if current != version:
            raise VersionConflict(target)
        self.write_bytes(data, *parts)
        return _digest(data)

    def delete_version(self, version: str, *parts: str) -> bool:
        """Remove an object only while it is still at `version`; whether it was removed."""
        target = self.path(*parts)
        try:
            if self._s3:
                self.fs.call_s3("delete_object", IfMatch=version, **self._s3_key(target))
                self.fs.invalidate_cache(target)
                return True
            _, current = self.read_versioned(*parts)
            if current != version:
                return False
            self.remove(*parts)
            return True
        except FileNotFoundError:
            return False
        except Exception as e:
            if _precondition_failed(e):
                return False
            raise explain(self.url, e) from None

    @property
    def _s3(self) -> bool:
        return split_protocol(self.url)[0] in ("s3", "s3a")

    def _s3_key(self, target: str) -> dict:
        bucket, key, _ = self.fs.split_path(target)
        return {"Bucket": bucket, "Key": key}

    def _local_tmp(self, data: bytes, target: str) -> str:
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=os.path.dirname(target))
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def check_writable(self) -> None:
        """Probe the location once before a run, so a bad bucket fails in seconds."""
        if not is_remote(self.url):
            os.makedirs(self.root, exist_ok=True)
            return
        # A name of its own: concurrent trials probing one bucket must not remove each other's probe.
        probe = self.path(f".rayganx_probe_{os.getpid()}_{uuid.uuid4().hex[:12]}")
        try:
            self._call(self.fs.pipe_file, probe, b"ok")
            self._call(self.fs.rm, probe)
        except FileNotFoundError:
            raise StorageError(f"{self.url}: the bucket does not exist") from None


def load_bytes(data: bytes, where: str, map_location="cpu"):
    """torch.load of tensors, dicts, lists and numbers only: nothing in the file is executed."""
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "Unsupported global" in ln or "GLOBAL" in ln), "")
        raise StorageError(f"{where}: refused: the file holds objects other than tensors and plain data, and "
                           f"loading it could run code" + (f" ({detail.strip()[:160]})" if detail else "")) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise StorageError(f"{where}: not a readable PyTorch file ({str(e).splitlines()[0][:160]})") from None


def download(url: str, to: str, endpoint_url: str | None = None, progress=None) -> list[str]:
    """Copy a checkpoint folder to a local directory; `progress(bytes_done, bytes_total)`."""
    store = Store(url, endpoint_url)
    # pyarrow's S3 client leaves empty "folder/" marker objects: not files of the checkpoint
    files = [f for f in store.find().values() if f["type"] == "file" and not f["name"].endswith("/")
             and posixpath.relpath(f["name"], store.root) != "."]
    if not files:
        raise StorageError(f"{url}: no such checkpoint")
    # Every name is checked before anything is written: a crafted key fails the pull, whole.
    rels = [contained(relative_key(f["name"], store.root), url) for f in files]
    total, done, written = sum(f["size"] or 0 for f in files), 0, []
    for f, rel in zip(files, rels):
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
