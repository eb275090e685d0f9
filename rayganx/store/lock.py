"""The run lock: one writer per run, fenced by the store's own atomic operations.

`lock.json` in the run folder names the holder (owner, host, process, a random token) and its
last heartbeat. It is created only where none exists (S3 `If-None-Match: *`, a hard link on
local disk), refreshed and taken over only from the version last seen (S3 `If-Match` on the
ETag, a compare-and-replace under `flock` on local disk), so of two processes racing for it
exactly one wins. A holder whose heartbeat finds another token has lost the lock: it stops
writing (`lost` is set, `check` raises, `on_lost` ends the run) within a heartbeat. Stores with
no conditional write (GCS through fsspec, other fsspec schemes) get the same protocol as
read-compare-write, which two processes racing within milliseconds can both pass: one warning
says so, and docs/storage.md.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable

from rayganx.store.storage import Store, StorageError, VersionConflict

LOCK = "lock.json"
log = logging.getLogger("rayganx")
_warned: set[str] = set()


class RunLockedError(StorageError):
    """Another live process holds the run."""


class LockLostError(StorageError):
    """This process no longer holds the run's lock: another took it over."""


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs under that pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def describe(held: dict) -> str:
    return f"{held.get('owner', '?')}@{held.get('host', '?')} (pid {held.get('pid', '?')})"


# Tokens of the locks this process holds now: a lock of this process's whose token is not here was
# left behind by a run of it that ended without removing it (the store away at that moment).
_live_tokens: set[str] = set()


class RunLock:
    """The lock of one run. A lock whose heartbeat is older than `stale_after` seconds, or whose
    holder is a process of this host that is gone, belongs to a process that died without
    releasing it, and is taken over; `force` takes over a live one."""

    def __init__(self, run: Store, heartbeat_s: float | None = None, stale_after: float = 60.0,
                 on_lost: Callable[[str], None] | None = None):
        # RAYGANX_LOCK_HEARTBEAT_S: a shorter heartbeat (tests; stores where a minute to notice a
        # takeover is too long) costs one small conditional write per beat.
        heartbeat_s = heartbeat_s or float(os.environ.get("RAYGANX_LOCK_HEARTBEAT_S") or 10.0)
        self.run, self.heartbeat_s, self.stale_after, self.on_lost = run, heartbeat_s, stale_after, on_lost
        self.token = uuid.uuid4().hex
        self.info = {"owner": getpass.getuser(), "host": socket.gethostname(), "pid": os.getpid(),
                     "token": self.token, "started": time.time()}
        self.version: str | None = None
        self.lost = threading.Event()
        self.why_lost = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(self.info | {"heartbeat": time.time()}).encode()

    def holder(self) -> tuple[dict | None, str | None]:
        """The lock's content and version, (None, None) when there is none."""
        try:
            data, version = self.run.read_versioned(LOCK)
        except FileNotFoundError:
            return None, None
        try:
            held = json.loads(data)
        except ValueError:
            held = {}  # a torn lock (an old rayganx, or a bad disk): stale
        return (held if isinstance(held, dict) else {}), version

    def _stale(self, held: dict) -> str | None:
        age = time.time() - float(held.get("heartbeat") or 0)
        if age >= self.stale_after:
            return f"no heartbeat for {age:.0f} s"
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            if not pid_alive(held["pid"]):
                return "its process is gone"
            if held["pid"] == os.getpid() and held.get("token") not in _live_tokens:
                return "an earlier run of this process ended without removing it"
        return None

    def acquire(self, force: bool = False) -> str | None:
        """Take the lock; returns a message when a stale (or, with force, a live) lock was taken over."""
        # Live from before the first write: another taker in this process must not take this token's
        # lock for one left behind between our create and our first heartbeat.
        _live_tokens.add(self.token)
        try:
            return self._acquire(force)
        except BaseException:
            _live_tokens.discard(self.token)
            raise

    def _acquire(self, force: bool) -> str | None:
        if not self.run.atomic and self.run.url not in _warned:
            _warned.add(self.run.url)
            log.warning("%s: this store has no conditional writes; the run lock cannot stop two processes "
                        "that start within milliseconds of each other (docs/storage.md)", self.run.url)
        note = None
        try:
            self.version = self.run.create(self._body(), LOCK)
        except FileExistsError:
            first = None
            for _ in range(5):  # a live holder's heartbeat between our read and our write: read and judge again
                held, version = self.holder()
                if held is None:  # released in between: try once more from scratch
                    return self._acquire(force)
                if held.get("token") == self.token:  # ours: a retried create whose first answer was lost
                    self.version = version
                    return self._start_beating(None)
                if first is not None and held.get("token") != first.get("token"):
                    raise RunLockedError(f"{self.run.url}: another process took the run lock at the same moment")
                first = first or held
                stale = self._stale(held)
                if not stale and not force:
                    age = time.time() - float(held.get("heartbeat") or 0)
                    raise RunLockedError(
                        f"{self.run.url}: in use by {describe(held)}, last heartbeat {age:.0f} s ago; wait for it to "
                        f"end or stop it, or pass --force to take the run over") from None
                try:
                    self.version = self.run.replace(self._body(), version, LOCK)
                    break
                except FileNotFoundError:
                    continue
                except VersionConflict:
                    continue
            else:
                raise RunLockedError(f"{self.run.url}: another process took the run lock at the same moment")
            note = f"took over the run lock of {describe(held)} ({stale or '--force'})"
        return self._start_beating(note)

    def _start_beating(self, note: str | None) -> str | None:
        self._thread = threading.Thread(target=self._beat, name="rayganx-run-lock", daemon=True)
        self._thread.start()
        return note

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.version = self.run.replace(self._body(), self.version, LOCK)
            except (VersionConflict, FileNotFoundError):
                try:
                    held, version = self.holder()
                except Exception:  # noqa: BLE001 - unreadable now: try again at the next beat
                    continue
                if held and held.get("token") == self.token:
                    # Still ours: a heartbeat the store took while its answer was lost (an outage) moved
                    # the version on. Go on from the version it holds.
                    self.version = version
                    continue
                self._lose(f"{self.run.url}: the run lock was taken over by {describe(held or {})}; this run "
                           f"stopped writing")
                return
            except Exception:  # a store outage: the lock goes stale only after stale_after
                continue

    def _lose(self, why: str) -> None:
        self.why_lost = why
        self.lost.set()
        log.warning("%s", why)
        if self.on_lost:
            self.on_lost(why)

    def check(self) -> None:
        """Raise when the lock was lost: call before anything is written."""
        if self.lost.is_set():
            raise LockLostError(self.why_lost)

    def still_held(self) -> bool:
        """Read the lock now: whether this token still holds it (a writer's fence before a commit)."""
        held, _ = self.holder()
        return bool(held) and held.get("token") == self.token

    def release(self) -> None:
        _live_tokens.discard(self.token)
        self._stop.set()
        if self._thread:
            # Wait out a heartbeat write in flight: removed first, it would put the lock back.
            self._thread.join()
        if self.version and not self.lost.is_set():
            try:
                self.run.delete_version(self.version, LOCK)
            except Exception:  # noqa: BLE001 - a lock left behind goes stale
                pass


def holds(run: Store, token: str | None) -> bool:
    """Whether `token` holds the run's lock (a worker's fence before it commits a checkpoint)."""
    if not token:
        return True
    try:
        data, _ = run.read_versioned(LOCK)
        return json.loads(data).get("token") == token
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - unreadable now (an outage): the heartbeat decides
        return True
