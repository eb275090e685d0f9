"""`rayganx tb`: TensorBoard on runs and sweeps, local or on object storage.

Remote runs' event files are copied into a local cache (only files not there yet: event files
are never rewritten), and TensorBoard, the installed package, serves the local folders on
127.0.0.1. Nothing is downloaded but the runs' own event files.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

from rayganx.store.storage import Store, StorageError, filesystem, is_remote
from rayganx.store.tracking import TB_DIR, find_runs, sync_events


class TensorBoardError(StorageError):
    """TensorBoard could not start; one line for the user."""


@dataclass
class Logdirs:
    cache: str
    named: list = field(default_factory=list)    # (name, local folder TensorBoard reads)
    remote: list = field(default_factory=list)   # (run Store, local tb folder it syncs into)

    def spec(self) -> str:
        return ",".join(f"{name}:{path}" for name, path in self.named)


def default_cache() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rayganx", "tb")


def tb_logdirs(urls: list[str], endpoint_url: str | None, cache: str | None = None) -> Logdirs:
    """Where TensorBoard reads each run or sweep: the run store itself for local ones, the
    cache for remote ones (a sweep keeps its trial folders, so its runs are named by trial)."""
    out = Logdirs(cache=os.path.abspath(cache or default_cache()))
    names: list[str] = []
    for url in urls:
        store = Store(url, endpoint_url)
        runs = find_runs(store)
        if not runs:
            raise StorageError(f"{url}: no rayganx run there (no spec.yaml, and no trial folders with one)")
        sweep = not (len(runs) == 1 and runs[0].url == store.url)
        name = posixpath.basename(store.root.rstrip("/")) or "run"
        name = name if name not in names else f"{name}_{len(names)}"
        names.append(name)
        if not is_remote(url):
            out.named.append((name, store.root))  # TensorBoard names the run <name>/tb
            continue
        _, path = filesystem(url, endpoint_url)
        local = os.path.join(out.cache, *[p for p in re.split(r"[/\\]+", path) if p not in ("", ".", "..")])
        for run in runs:
            dest = os.path.join(local, posixpath.basename(run.root), TB_DIR) if sweep else os.path.join(local, TB_DIR)
            out.remote.append((run, dest))
        out.named.append((name, local))
    return out


def sync_all(logdirs: Logdirs) -> int:
    return sum(sync_events(run, dest) for run, dest in logdirs.remote)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tensorboard(logdir_spec: str, port: int = 6006, timeout: float = 90):
    """TensorBoard serving on 127.0.0.1 until the block ends; yields its URL once it answers."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir_spec", logdir_spec,
                             "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "10"],
                            stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
                why = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else "")
                raise TensorBoardError(f"TensorBoard did not start on port {port}: {why.strip()[:300]}")
            try:
                urllib.request.urlopen(url, timeout=2).read(1)
                break
            except OSError:
                if time.time() > deadline:
                    raise TensorBoardError(f"TensorBoard did not answer on {url} within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def serve(logdirs: Logdirs, sync_every: float) -> None:
    """Keep the remote runs' copies current until Ctrl-C or SIGTERM (TensorBoard re-reads them
    itself). SIGTERM (kill, Kubernetes) ends it like Ctrl-C, so TensorBoard is stopped too.

    The signals set an event instead of raising: an exception raised in the middle of a sync
    (inside the object-store client's own threads and retries) could be swallowed there."""
    import threading

    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    sync = logdirs.remote and sync_every > 0
    while not stopped.wait(sync_every if sync else 1.0):
        if sync:
            with contextlib.suppress(StorageError):  # a store hiccup: the next sync catches up
                sync_all(logdirs)
