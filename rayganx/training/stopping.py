"""How a run stops: Ctrl-C and SIGTERM reach the caller at once (`fit_interruptibly`), a run
whose lock is taken over ends within a heartbeat (`locked`), and the embedded Ray shuts down
without turning a Ctrl-C into a hang."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable

from rayganx.job.spec import JobSpec
from rayganx.store.storage import Store


def _stop_callback(flag: str):
    """A Ray Train controller callback that ends the run when `flag` (a file) appears. The
    controller runs on the driver's node and calls it at every state update (each health check);
    an error raised there ends the run without a retry, its workers stopped."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class StopWhenFlagged(ControllerCallback):
        def after_controller_state_update(self, previous_state, current_state):
            if os.path.exists(flag):
                from rayganx.store.lock import LockLostError

                with open(flag) as f:
                    raise LockLostError(f.read().strip())

    return StopWhenFlagged()


@contextlib.contextmanager
def locked(spec: JobSpec, force: bool = False, notify: Callable[[str], None] | None = None):
    """The run's lock for as long as it trains: yields (the lock, a Ray Train callback that ends
    the run within a heartbeat once the lock is taken over)."""
    import tempfile
    import uuid

    from rayganx.store.lock import RunLock

    # Unique per take: a flag left by a killed process must never stop a later run that was given
    # the same pid (pids wrap at 32768 on many hosts).
    flag = os.path.join(tempfile.gettempdir(), f"rayganx-stop-{os.getpid()}-{uuid.uuid4().hex}")

    def lost(why: str) -> None:
        with open(flag, "w") as f:
            f.write(why)

    lock = RunLock(Store(spec.run_url, spec.storage.endpoint_url), on_lost=lost)
    note = lock.acquire(force=force)
    if note and notify:
        notify(note)
    try:
        yield lock, _stop_callback(flag)
    finally:
        lock.release()
        with contextlib.suppress(OSError):
            os.unlink(flag)


STOPPED_BY = ["SIGINT"]  # the signal that ended the last interrupted fit


def fit_interruptibly(trainer):
    """trainer.fit() in a thread. In the main thread Ray Train installs its own Ctrl-C handler,
    which ends the process through sys.exit; here Ctrl-C reaches the caller as KeyboardInterrupt
    at once, and the run's controller and workers, owned by this process, end with it."""
    box: dict = {}
    interrupted = threading.Event()

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    def on_sigint(signum, frame):
        interrupted.set()
        STOPPED_BY[0] = signal.Signals(signum).name
        raise KeyboardInterrupt

    # Python runs a signal handler wherever the main thread is, and a KeyboardInterrupt raised
    # inside a finalizer (a Ray object's __del__) is printed and dropped: the flag survives that.
    # A caller that ignores SIGINT (a background job) keeps ignoring it.
    main = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
    previous = previous_term = None
    try:
        if main:
            previous = signal.signal(signal.SIGINT, on_sigint)
            # SIGTERM (a scheduler, `kill`) ends the run the same way, with its own line, instead of
            # the process vanishing without a word.
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                previous_term = signal.signal(signal.SIGTERM, on_sigint)
        thread = threading.Thread(target=target, name="rayganx-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)  # a timed join lets KeyboardInterrupt through
            if interrupted.is_set():
                raise KeyboardInterrupt
    finally:
        if main:  # None: the handler was not set from Python; Python's own is the sensible one
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
    if "error" in box:
        raise box["error"]
    return box["result"]


def shutdown_embedded_ray(timeout: float = 30.0) -> None:
    """Stop this process's embedded Ray after Ctrl-C, waiting at most `timeout`: the interrupted
    fit thread and the progress poller may still be inside Ray calls, and a shutdown racing them
    must not turn a Ctrl-C into a hang (the embedded cluster's processes end with this one)."""
    import ray

    thread = threading.Thread(target=ray.shutdown, name="rayganx-shutdown", daemon=True)
    thread.start()
    thread.join(timeout)
