"""What a run keeps in its store, each file written whole so a reader never takes a cut-off one
for a complete one. Run layout (stable, documented in docs/storage.md):

    <storage>/<job name>/spec.yaml                resolved spec, ${VAR} placeholders, no secrets
    <storage>/<job name>/specs/attempt_XXXX.yaml  every attempt's spec and the step it started at
    <storage>/<job name>/metrics/part_XXXXXXXXX.jsonl   metrics, appended as whole parts
    <storage>/<job name>/samples/step_XXXXXX.png  sample grids from fixed noise
    <storage>/<job name>/checkpoint_XXXXXX/       Ray Train checkpoints: state.pt, meta.json,
                                                  spec.yaml, and complete.json written last
    <storage>/<job name>/lock.json                the run lock (rayganx.store.lock: owner, host, token, heartbeat)
    <storage>/<job name>/checkpoint_manager_snapshot.json   Ray's own bookkeeping
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import time

from rayganx.store.storage import Store, StorageError, load_bytes, unsafe_key

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)(?:_(\d+))?$")  # step, generation (checkpointing.folder_name)
MARKER = "complete.json"  # written last into a checkpoint folder: without it the folder is partial
METRICS_DIR = "metrics"
PART_RE = re.compile(r"^part_(\d+)(?:_([0-9a-f]+))?\.jsonl$")  # sequence, writer

log = logging.getLogger("rayganx")


def _parts(run: Store) -> list[tuple[int, str]]:
    out = []
    for entry in run.listdir(METRICS_DIR):
        m = PART_RE.match(posixpath.basename(entry["name"]))
        if m and entry.get("type") == "file":
            # In write order: by sequence, then (two writers at once) by the time each part was written.
            out.append((int(m.group(1)), entry.get("mtime") or entry.get("LastModified") or 0,
                        posixpath.basename(entry["name"])))
    return [(seq, name) for seq, _, name in sorted(out, key=lambda t: (t[0], str(t[1]), t[2]))]


def _parse_lines(text: str, where: str) -> list[dict]:
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict) and (isinstance(row.get("step"), int) or isinstance(row.get("restart_from"), int)):
            rows.append(row)
        else:
            bad += 1
    if bad:
        log.warning("%s: skipped %d unreadable metrics line(s)", where, bad)
    return rows


def read_metrics(run: Store, last_only: bool = False) -> list[dict]:
    """A run's metrics rows in the order they were logged. A part that begins with
    {"restart_from": S} (a resumed attempt, or a divergence rollback) supersedes the rows after
    step S that the abandoned attempt logged. An unreadable line is skipped, never fatal."""
    parts = _parts(run)
    if last_only:  # the newest part that holds a row
        for _, name in reversed(parts):
            rows = [r for r in _parse_lines(_read_part(run, name), run.url) if "step" in r]
            if rows:
                return rows[-1:]
        return []
    rows: list[dict] = []
    for _, name in parts:
        for row in _parse_lines(_read_part(run, name), f"{run.url}/{METRICS_DIR}/{name}"):
            if "restart_from" in row:
                rows = [r for r in rows if r["step"] <= row["restart_from"]]
            else:
                rows.append(row)
    return rows


def _read_part(run: Store, name: str) -> str:
    try:
        return run.read_text(METRICS_DIR, name)
    except FileNotFoundError:
        return ""


class MetricsLog:
    """Appends a run's metrics as whole numbered part files: nothing is ever rewritten, a reader
    never sees half a file, and a crash loses at most the rows not yet flushed (the resumed run
    logs those steps again). Object-storage traffic stays linear in the run: one small PUT per
    flush, at checkpoints and at most every `flush_every_s` seconds between them.

    writer: this attempt's name in its part files (its run-lock token), so two processes that
    both believe they hold the run never overwrite each other's parts: each part is created, never
    replaced, and says who wrote it. uploader: writes go through it, off the training thread."""

    def __init__(self, run: Store, start_step: int, flush_every_s: float = 30.0, writer: str = "",
                 uploader=None):
        self.run, self.flush_every_s, self.writer, self.uploader = run, flush_every_s, writer[:8], uploader
        parts = _parts(run)
        self.seq = parts[-1][0] + 1 if parts else 0
        # An attempt that resumes from a checkpoint at step S supersedes what was logged after S.
        self.pending: list[dict] = [{"restart_from": start_step}] if parts else []
        self.last_flush = time.monotonic()

    def append(self, row: dict, force: bool = False) -> None:
        self.pending.append(row)
        if force or time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()

    def rollback(self, event: dict) -> None:
        """Divergence: what was logged after event["step"] is superseded; the event is kept."""
        self.append({"restart_from": event["step"]})
        self.append(event, force=True)

    def flush(self) -> None:
        if not self.pending:
            return
        data = "".join(json.dumps(r) + "\n" for r in self.pending).encode()
        name = f"part_{self.seq:06d}" + (f"_{self.writer}" if self.writer else "") + ".jsonl"
        if self.uploader is not None:
            self.uploader.put(self.run, data, METRICS_DIR, name, create=True)
        else:
            self.run.create(data, METRICS_DIR, name)
        self.seq, self.pending, self.last_flush = self.seq + 1, [], time.monotonic()


# --------------------------------------------------------------------------- checkpoints


def checkpoint_manifest(local_dir: str, step: int) -> dict:
    """The completion marker of a checkpoint folder: every file with its size and SHA-256."""
    files = {}
    for name in sorted(os.listdir(local_dir)):
        path = os.path.join(local_dir, name)
        if os.path.isfile(path) and name != MARKER:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            files[name] = {"size": os.path.getsize(path), "sha256": h.hexdigest()}
    return {"format": 1, "step": step, "time": time.time(), "files": files}


def checkpoint_step(name: str) -> int:
    m = CHECKPOINT_RE.match(name)
    if not m:
        raise ValueError(f"not a checkpoint folder name: {name}")
    return int(m.group(1))


def _write_order(c: dict) -> tuple[int, int]:
    """Checkpoints in the order they were written: by generation, then by step."""
    m = CHECKPOINT_RE.match(c["name"])
    return int(m.group(2) or 0), int(m.group(1))


def _incomplete_reason(run: Store, name: str, listing: list[dict]) -> tuple[str | None, dict]:
    folder = run.path(name).rstrip("/")
    # An object store lists "folder/" itself for a key with "//" in it: a directory entry named as the folder.
    own = [f for f in listing if f["name"].rstrip("/") == folder and f.get("type") != "file"]
    entries = {posixpath.basename(f["name"].rstrip("/")): f for f in listing if f["name"].rstrip("/") != folder}
    sizes = {n: f.get("size") for n, f in entries.items() if f.get("type") == "file"}
    if MARKER not in sizes:
        return "no completion marker (cut off while being written?)", {}
    try:
        manifest = json.loads(run.read_text(name, MARKER))
        files = {str(f): int(info["size"]) for f, info in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return "unreadable completion marker", {}
    # Nothing but what the marker lists: a shared bucket may hold keys planted beside a checkpoint.
    extra = [n for n, f in entries.items() if n != MARKER and (n not in files or f.get("type") != "file")]
    if own or extra:
        what = repr(extra[0]) if extra else "a key with an empty segment"
        odd = unsafe_key(extra[0]) if extra else "an absolute path"
        return f"refused: it holds {what}, which its marker does not list" + (f" ({odd})" if odd else ""), {}
    for fname, size in files.items():
        if fname not in sizes:
            return f"{fname} is missing", {}
        if sizes[fname] is not None and sizes[fname] != size:
            return f"{fname} has {sizes[fname]} bytes, the marker says {size}", {}
    return None, manifest


def scan_checkpoints(run: Store) -> tuple[list[dict], list[dict]]:
    """(complete, incomplete) checkpoints of a run, oldest first. Complete ones carry step, name,
    url, size, time and the metrics saved with them; incomplete ones say why."""
    complete, incomplete = [], []
    for entry in run.listdir():
        name = posixpath.basename(entry["name"].rstrip("/"))
        m = CHECKPOINT_RE.match(name)
        if not m or entry.get("type") != "directory":
            continue
        files = run.listdir(name)
        url = run.url.rstrip("/") + "/" + name
        why, manifest = _incomplete_reason(run, name, files)
        if why:
            incomplete.append({"step": int(m.group(1)), "name": name, "url": url, "reason": why})
            continue
        meta: dict = {}
        if "meta.json" in manifest["files"]:
            with contextlib.suppress(ValueError):  # the listing columns are optional; the state is not
                meta = json.loads(run.read_text(name, "meta.json"))
        complete.append({
            "step": int(m.group(1)), "name": name, "url": url,
            "size": sum(f.get("size") or 0 for f in files), "time": meta.get("time", manifest.get("time")),
            "metrics": meta.get("metrics", {}), "sha256": manifest["files"].get("state.pt", {}).get("sha256"),
        })
    return sorted(complete, key=_write_order), sorted(incomplete, key=_write_order)


def list_checkpoints(run: Store, warn: bool = True) -> list[dict]:
    """The complete checkpoints of a run, oldest first; incomplete ones are logged and left out."""
    complete, incomplete = scan_checkpoints(run)
    if warn:
        for c in incomplete:
            log.warning("ignoring incomplete checkpoint %s: %s", c["url"], c["reason"])
    return complete


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
        metrics = read_metrics(run, last_only=True)
        last = metrics[-1] if metrics else {}
        runs.append({"name": name, "model": spec.get("model", {}).get("kind", "?"),
                     "step": last.get("step"), "time": last.get("time"), "metrics": last})
    return sorted(runs, key=lambda r: r["name"])


# --------------------------------------------------------------------------- the specs a run ran under

SPECS_DIR = "specs"
ATTEMPT_RE = re.compile(r"^attempt_(\d+)\.yaml$")


def spec_history(run: Store) -> list[dict]:
    """Every attempt of a run, oldest first: {"attempt", "start_step", "time", "spec"}."""
    import yaml

    out = []
    for entry in run.listdir(SPECS_DIR):
        m = ATTEMPT_RE.match(posixpath.basename(entry["name"]))
        if m and entry.get("type") == "file":
            with contextlib.suppress(ValueError, yaml.YAMLError):
                row = yaml.safe_load(run.read_text(SPECS_DIR, posixpath.basename(entry["name"])))
                if isinstance(row, dict) and isinstance(row.get("spec"), dict):
                    out.append(row | {"attempt": int(m.group(1))})
    return sorted(out, key=lambda r: r["attempt"])


def stored_spec(run: Store) -> dict | None:
    """The spec the run last ran under (spec.yaml), or None for a new run."""
    import yaml

    try:
        raw = yaml.safe_load(run.read_text("spec.yaml"))
    except FileNotFoundError:
        return None
    return raw if isinstance(raw, dict) else None


def record_attempt(run: Store, spec_yaml: str, start_step: int) -> int:
    """Keep this attempt's spec (specs/attempt_XXXX.yaml) and make it the run's spec.yaml."""
    import yaml

    attempt = max([r["attempt"] for r in spec_history(run)], default=0) + 1
    row = {"attempt": attempt, "start_step": start_step, "time": time.time(), "spec": yaml.safe_load(spec_yaml)}
    run.write_text(yaml.safe_dump(row, sort_keys=False), SPECS_DIR, f"attempt_{attempt:04d}.yaml")
    run.write_text(spec_yaml, "spec.yaml")
    return attempt


def split_checkpoint_url(url: str) -> tuple[str, str]:
    """(run URL, checkpoint folder name) of a checkpoint URL."""
    url = url.rstrip("/")
    return url.rsplit("/", 1)[0], url.rsplit("/", 1)[1]


def load_state(url: str, endpoint_url: str | None = None, map_location="cpu") -> dict:
    """The state.pt of a complete checkpoint folder (or a .pt file), local or remote; no Ray needed.
    A folder without its completion marker, or whose state.pt does not match it, is refused."""
    store = Store(url, endpoint_url)
    if url.endswith(".pt"):
        try:
            return load_bytes(store.read_bytes(), url, map_location)
        except FileNotFoundError:
            raise StorageError(f"{url}: no such file") from None
    listing = store.listdir()
    if not any(posixpath.basename(f["name"]) == "state.pt" for f in listing):
        raise StorageError(f"{url}: not a rayganx checkpoint (no state.pt)")
    parent, name = split_checkpoint_url(url)
    why, manifest = _incomplete_reason(Store(parent, endpoint_url), name, listing)
    if why:
        raise StorageError(f"{url}: incomplete checkpoint: {why}")
    data = store.read_bytes("state.pt")
    expected = manifest["files"].get("state.pt", {}).get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise StorageError(f"{url}: incomplete checkpoint: state.pt does not match its checksum")
    return load_bytes(data, f"{url}/state.pt", map_location)
