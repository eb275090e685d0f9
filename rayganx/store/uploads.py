"""Writes to the run store off the training thread, through a store's bad minutes.

Rank 0's metrics parts, TensorBoard files and sample grids go through one `Uploader`: a bounded
queue and one thread that writes them in order. A write that fails is retried with backoff for
up to `storage.outage_tolerance_s` seconds, while training goes on and the rows queue up; a store
that stays away longer ends the run with one line (its last complete checkpoint is intact). A
full queue (a store much slower than training) makes the training thread wait instead of using
more memory. Checkpoint uploads, which Ray Train runs in its own thread, retry with the same
`retrying`.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
from typing import Callable, TypeVar

import pyarrow.fs as pafs

from rayganx.store.lock import LockLostError
from rayganx.store.storage import Store, StorageError

log = logging.getLogger("rayganx")
T = TypeVar("T")


class OutageError(StorageError):
    """The store stayed unreachable longer than storage.outage_tolerance_s."""


def retrying(fn: Callable[[], T], what: str, tolerance_s: float, stop: threading.Event | None = None,
             first_wait: float = 0.5, longest_wait: float = 10.0) -> T:
    """fn() until it succeeds, waiting longer each time (0.5 s, doubling up to 10 s) for up to
    tolerance_s after its first failure; then OutageError naming `what` and the last cause."""
    failed_at, wait = None, first_wait
    while True:
        try:
            return fn()
        except (OutageError, FileExistsError, LockLostError):
            raise
        except Exception as e:  # noqa: BLE001 - every store error is retried alike
            now = time.monotonic()
            failed_at = failed_at or now
            if now - failed_at >= tolerance_s:
                cause = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise OutageError(f"{what}: the store stayed unreachable for {now - failed_at:.0f} s "
                                  f"(storage.outage_tolerance_s={tolerance_s:g}): {cause}") from None
            if failed_at == now:
                log.warning("%s: store error (%s); retrying for up to %g s", what, type(e).__name__, tolerance_s)
            if stop is None:
                time.sleep(wait)
            elif stop.wait(wait):
                raise OutageError(f"{what}: stopped while retrying") from None
            wait = min(wait * 2, longest_wait)


class Uploader:
    """One background writer of whole files into a run store. `put` queues a write (waiting when
    `max_items` are queued); `check` raises the error that ended the writer on the training thread;
    `drain` waits until everything queued is written."""

    def __init__(self, tolerance_s: float = 300.0, max_items: int = 64):
        self.tolerance_s = tolerance_s
        self.q: queue.Queue = queue.Queue(maxsize=max_items)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rayganx-uploads", daemon=True)
        self._thread.start()

    def put(self, store: Store, data: bytes, *parts: str, create: bool = False) -> None:
        """Queue a whole-file write (create: the name must be new; written only once even when a
        retry follows a write whose answer was lost)."""
        self.check()
        while True:
            try:
                self.q.put((store, data, parts, create), timeout=1.0)
                return
            except queue.Full:
                self.check()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                self.q.task_done()
                return
            store, data, parts, create = item
            try:
                if self.error is None:
                    retrying(lambda: _write(store, data, parts, create), f"{store.url}/{'/'.join(parts)}",
                             self.tolerance_s, self._stop)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self.error = e
            finally:
                self.q.task_done()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def drain(self) -> None:
        """Wait until every queued write is done (at most the outage tolerance per write)."""
        self.q.join()
        self.check()

    def close(self) -> None:
        self._stop.set()
        self.q.put(None)
        self._thread.join(timeout=5)


def _write(store: Store, data: bytes, parts: tuple, create: bool) -> None:
    if not create:
        store.write_bytes(data, *parts)
        return
    try:
        store.create(data, *parts)
    except FileExistsError:
        # Ours already when a retry follows a write whose answer was lost: the name is this writer's own.
        if store.read_bytes(*parts) != data:
            raise StorageError(f"{store.url}/{'/'.join(parts)}: exists with other contents") from None



# Errors that say what is there, not that the store is away: never retried.
_ANSWERS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class _Spooled:
    """A file pyarrow writes into; on close it is put whole, retried from the start."""

    def __init__(self, handler: "TolerantHandler", path: str):
        self.handler, self.path, self.closed = handler, path, False
        self.buf = tempfile.SpooledTemporaryFile(max_size=8 << 20)

    def write(self, data) -> int:
        return self.buf.write(data)

    def tell(self) -> int:
        return self.buf.tell()

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        def put():
            self.buf.seek(0)
            with self.handler.fs.open_output_stream(self.path) as out:
                shutil.copyfileobj(self.buf, out, 4 << 20)
        try:
            self.handler.retry(put)
        finally:
            self.buf.close()


class TolerantHandler(pafs.FileSystemHandler):
    """Every call of a pyarrow filesystem retried through a store outage of up to tolerance_s
    (see tolerant_filesystem)."""

    def __init__(self, fs, what: str, tolerance_s: float):
        self.fs, self.what, self.tolerance_s = fs, what, tolerance_s

    def retry(self, fn):
        def answered():
            try:
                return fn(), None
            except _ANSWERS as e:
                return None, e
        value, error = retrying(answered, self.what, self.tolerance_s)
        if error is not None:
            raise error
        return value

    def __eq__(self, other):
        return isinstance(other, TolerantHandler) and other.fs.equals(self.fs) and other.what == self.what

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return f"rayganx-tolerant+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.retry(lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self.retry(lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self.retry(lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self.retry(lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.retry(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise PermissionError("rayganx never empties a store's root")

    def delete_file(self, path):
        self.retry(lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self.retry(lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self.retry(lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        import pyarrow as pa
        return self.retry(lambda: pa.BufferReader(self.fs.open_input_stream(path).read()))

    def open_input_file(self, path):
        import pyarrow as pa
        return self.retry(lambda: pa.BufferReader(self.fs.open_input_file(path).read()))

    def open_output_stream(self, path, metadata):
        import pyarrow as pa
        return pa.PythonFile(_Spooled(self, path), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("object stores do not append")


def tolerant_filesystem(fs, what: str, tolerance_s: float):
    """A pyarrow filesystem whose calls retry through a store outage of up to tolerance_s, for
    Ray Train's own writes into a run store (the controller's checkpoint-manager snapshot, the
    upload of a reported checkpoint): without it an outage of a few seconds at the wrong moment
    ends the run from the controller. Files are spooled locally and put whole, so a put cut off by
    the outage is made again from the start."""
    return pafs.PyFileSystem(TolerantHandler(fs, what, tolerance_s))
