"""How this process reaches Ray: the cluster it runs in, or an embedded one on this machine.

Also the one rule every place that sizes CPUs follows (the embedded Ray, a sweep's trials at
once, a Kubernetes pod): Ray Data's read and decode tasks each need a whole free CPU, so a node
the Train workers fill would starve the input pipeline; keep DATA_CPUS beyond the workers'.
"""

from __future__ import annotations

import logging
import os

DATA_CPUS = 1


def quiet_ray_env() -> None:
    """Environment that keeps Ray's own output out of the user's terminal."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def init_ray(address: str | None = None, verbose: bool = False, num_cpus: int | None = None) -> None:
    """Join the cluster this process runs in, or start an embedded one."""
    quiet_ray_env()
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
    kwargs = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR,
                  configure_logging=True)
    if address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # Ray Train's controller notices a finished (or failed) worker group at its next health check,
        # every 2 s by default: up to 2 s added to every run's start and end, which on this
        # machine's own Ray costs nothing to shorten. A cluster's setting is its operator's.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        # Logical CPUs are scheduling slots: a machine the workers fill still has Ray Data's. "local":
        # a Ray of this process's own, even where `ray start` left a cluster behind (ray.init would
        # join that one unasked), and beside another embedded run's.
        ray.init(address="local", num_cpus=num_cpus or (os.cpu_count() or 2) + DATA_CPUS, include_dashboard=True,
                 **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if not verbose:  # Ray Data logs each execution in the driver (data.cache materialises one)
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def logs_dir() -> str:
    """Where this Ray's own logs are (the details behind a failure)."""
    try:
        from ray._private.worker import _global_node

        return _global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - not started here, or another Ray version
        return "/tmp/ray/session_latest/logs"


def ray_is_up() -> bool:
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))
