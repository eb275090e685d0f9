"""A run's live progress: the actor the workers send each logged row (and each skipped file) to,
and the driver's reader that hands new rows to a printer. Storage is never polled for it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable


def run_monitor():
    """An actor that lives as long as the process that starts the run (it is not detached): the
    workers send it every logged row (live progress) and the decode tasks each corrupt file they
    skip. It goes with the run however the run ends.

    It is pinned to the driver's node: anywhere else, losing that node (which Ray Train survives)
    would take the run's live progress and its count of skipped files with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)

    @ray.remote(num_cpus=0, scheduling_strategy=here)
    class RunMonitor:
        def __init__(self):
            self.rows, self.skipped = [], []

        def put(self, row: dict) -> None:
            self.rows.append(row)

        def since(self, n: int) -> list[dict]:
            return self.rows[n:]

        def skipped_file(self, name: str) -> None:
            self.skipped.append(name)

        def skipped_files(self) -> list[str]:
            return self.skipped

    return RunMonitor.remote()


class Progress:
    """Follows a run live: the workers send each logged row to the run's monitor actor through
    Ray, and a thread here hands the new ones to the printer (storage is never polled)."""

    def __init__(self, monitor, start_step: int, printer: Callable[[dict], None]):
        self.monitor, self.seen, self.printer, self.n = monitor, start_step, printer, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        if exc[0] is None:
            with contextlib.suppress(Exception):  # the last rows are a display nicety
                self.poll_once()

    def _poll(self):
        while not self._stop.wait(0.5):
            try:
                self.poll_once()
            except Exception:  # progress display must never break the run
                pass

    def poll_once(self):
        import ray

        rows = ray.get(self.monitor.since.remote(self.n), timeout=10)
        self.n += len(rows)
        for m in rows:
            if m.get("event") or m.get("step", 0) > self.seen:
                self.seen = m["step"]
                self.printer(m)


def monitor_skipped(monitor) -> list[str] | None:
    """The files the decode tasks skipped; None when the monitor cannot say (its node was lost)."""
    import ray

    try:
        return ray.get(monitor.skipped_files.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        return None
