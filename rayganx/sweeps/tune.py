"""Ray Tune sweeps: a search space over job keys, ASHA or Population Based Training.

Each trial is a full rayganx job (`rayganx.sweeps.trial`); the sweep file and its checks are
`rayganx.sweeps.sweep`; the ranking at the end is `rayganx.sweeps.leaderboard`. Here: the Tuner, its
scheduler and search, how many trials run at once, and Ctrl-C.

Layout under <storage>/<sweep name>/: one run per trial (trial_00000/, ... with checkpoints,
samples and metrics/ as for any job), Tune's experiment state in tune/, and at the end
leaderboard.json and best_job.yaml.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from typing import Any, Callable

from rayganx.job.config import set_dotted
from rayganx.sweeps.leaderboard import best_job_yaml, leaderboard
from rayganx.job.cluster import DATA_CPUS, init_ray
from rayganx.job.sections import PATH_KEYS
from rayganx.store.storage import Store, absolute, is_remote
from rayganx.sweeps.sweep import Sweep, is_distribution
from rayganx.sweeps.trial import run_trial, trial_name


def _tune_domain(v: Any):
    from ray import tune

    if not is_distribution(v):
        return v
    kind, args = next(iter(v.items()))
    return {"choice": lambda: tune.choice(args), "grid": lambda: tune.grid_search(args),
            "uniform": lambda: tune.uniform(*args), "loguniform": lambda: tune.loguniform(*args),
            "randint": lambda: tune.randint(*args)}[kind]()


def _param_space(sw: Sweep) -> dict:
    space = {}
    for k, v in sw.space.items():
        if sw.spec.search == "grid" and is_distribution(v):
            v = {"grid": next(iter(v.values()))}
        space[k] = _tune_domain(v)
    for k, v in sw.mutations.items():
        space.setdefault(k, _tune_domain(v))
    return space


_PRINTER: list[Callable] = [lambda *a: None]  # module state: Tune pickles its callbacks with the sweep
_ENDED: set[str] = set()  # trials that finished, stopped or failed in this process


def _events_callback():
    """A Tune callback that hands trial events to the caller's printer (the CLI's live table)."""
    from ray.tune import Callback

    def printer(*args):
        # Looked up at call time: Tune pickles its callbacks, and the printer (a live terminal
        # table) must not travel with them.
        from rayganx.sweeps import tune as this

        if args[1] in ("ended", "error"):
            this._ENDED.add(args[0])
        this._PRINTER[0](*args)

    class Events(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            printer(trial_name(trial.trial_id), "running", None, trial.config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            printer(trial_name(trial.trial_id), "running", result, trial.config)

        def on_trial_complete(self, iteration, trials, trial, **info):
            printer(trial_name(trial.trial_id), "ended", None, trial.config)

        def on_trial_error(self, iteration, trials, trial, **info):
            printer(trial_name(trial.trial_id), "error", None, trial.config)

    return Events()


def _concurrency(sw: Sweep) -> int:
    """Trials at once. By default as many as the cluster holds now, with a CPU to spare: Ray Data's
    tasks need a whole free CPU, and trials holding every CPU would wait forever. On one node
    nothing autoscales, so asking for more than fit is an error; elsewhere the user decides."""
    import ray

    s, want, workers = sw.base.scaling, sw.spec.max_concurrent_trials, sw.workers_per_trial
    have = ray.cluster_resources()
    if s.use_gpu:
        fit = int(have.get("GPU", 0) // (workers * s.gpus_per_worker))
    else:
        fit = int((have.get("CPU", 1) - DATA_CPUS) // (workers * s.cpus_per_worker))
    if len(ray.nodes()) > 1:
        return want or max(1, fit)
    from rayganx.training.runner import RunError

    if fit < 1:
        raise RunError(f"scaling: one trial needs {workers} workers x {s.cpus_per_worker:g} CPU plus a CPU for "
                       f"Ray Data; this Ray has {have.get('CPU', 0):g}. Lower scaling.num_workers in the space, "
                       f"or run on a cluster with --address")
    if want and want > fit:
        raise RunError(f"max_concurrent_trials: {want} trials x {workers} workers do not fit this Ray "
                       f"({have.get('CPU', 0):g} CPUs, one kept for Ray Data); at most {fit}")
    return want or fit


def run(sw: Sweep, *, resume: bool = False, verbose: bool = False,
        printer: Callable[[str, str, dict | None, dict], None] | None = None, trust_state: bool = False) -> dict:
    """Run a sweep to completion; returns the leaderboard (also written to storage).

    Resuming makes Tune unpickle its state (tuner.pkl, the experiment state) from the sweep
    folder: code runs on this machine as whoever wrote it. From a local folder it is this user's
    own; from object storage, shared with others, it is refused unless trust_state."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    from rayganx.training import runner
    from rayganx.store.pyarrow_fs import ray_storage

    sw.spec.storage = absolute(sw.storage)
    root = Store(sw.root, sw.base.storage.endpoint_url)
    root.check_writable()
    exists = root.exists("tune")
    if exists and not resume:
        raise runner.RunError(f"sweep {sw.spec.name} already exists at {sw.root}; pass --resume to continue it, "
                              f"or change its name")
    if resume and not exists:
        raise runner.RunError(f"--resume: no sweep {sw.spec.name} at {sw.root} to continue")
    if resume and is_remote(sw.root) and not trust_state:
        raise runner.RunError(f"--resume: {sw.root}/tune holds Tune's pickled state, which resuming runs as code; on "
                              f"object storage anyone who can write the folder could plant it. Check who can, then "
                              f"pass --trust-sweep-state (docs/tune.md)")

    if not verbose:
        import warnings

        # Tune suggests reuse_actors for PBT; a trial here is a whole TorchTrainer run, not reusable.
        warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy engine at verbose=0 prints nothing
        # Each trial starts a controller, workers and Ray Data actors at once; the raylet warns
        # about that many worker processes at 4x this limit (the CPU count by default).
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "8")
        # A failed trial's cause is in the table and the leaderboard; Tune would add a traceback.
        import logging

        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    init_ray(verbose=verbose)
    _PRINTER[0] = printer or (lambda *a: None)
    # Trials run in their own working directories: local paths must be absolute here.
    base_raw = copy.deepcopy(sw.base_raw)
    for key, value in sw.base.paths().items():
        if key != "storage.path":  # the sweep's own storage holds the trials
            set_dotted(base_raw, key, absolute(value))
    # So must the ones the space sets, such as an extractor every trial shares.
    for key, v in sw.space.items():
        if key in PATH_KEYS and key != "storage.path":
            sw.space[key] = ({kind: [absolute(x) if isinstance(x, str) else x for x in args] for kind, args in v.items()}
                             if is_distribution(v) else absolute(v) if isinstance(v, str) else v)
    raw = sw.spec.model_dump(mode="json") | {"job": base_raw}
    trainable = tune.with_parameters(run_trial, sweep_raw=raw, source=sw.source)
    # The trial driver only waits on its TorchTrainer: the workers hold the CPUs and GPUs, and a
    # fractional CPU here would leave Ray Data less than the whole CPU its tasks ask for.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": 256 * 1024**2})

    concurrency = _concurrency(sw)
    s = sw.spec.scheduler
    if s.kind == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=sw.max_steps, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    elif s.kind == "pbt":
        scheduler = PopulationBasedTraining(
            time_attr="step", perturbation_interval=sw.interval, quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability, synch=s.synch,
            hyperparam_mutations={k: _tune_domain(v) for k, v in sw.mutations.items()})
    else:
        scheduler = FIFOScheduler()
    if sw.spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=sw.base.train.seed)
    else:  # seeded: the same sweep file samples the same trials
        from ray.tune.search import BasicVariantGenerator

        search = BasicVariantGenerator(random_state=sw.base.train.seed, max_concurrent=concurrency)
    storage = ray_storage(sw.root, sw.base.storage.endpoint_url)
    run_config = tune.RunConfig(name="tune", verbose=0, callbacks=[_events_callback()],
                                **storage)
    tune_config = tune.TuneConfig(
        metric=sw.metric, mode=sw.mode, num_samples=sw.spec.num_samples, scheduler=scheduler, search_alg=search,
        max_concurrent_trials=concurrency if sw.spec.search == "optuna" else None,
        trial_name_creator=lambda t: trial_name(t.trial_id),
        trial_dirname_creator=lambda t: trial_name(t.trial_id))
    path = root.path("tune") if is_remote(sw.root) else os.path.join(sw.root, "tune")
    if resume:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=_param_space(sw), **({"storage_filesystem": storage["storage_filesystem"]}
                                                                   if "storage_filesystem" in storage else {}))
    else:
        tuner = tune.Tuner(trainable, param_space=_param_space(sw), tune_config=tune_config, run_config=run_config)
    _ENDED.clear()
    grid, interrupted = _fit(tuner)
    board = leaderboard(sw, grid)
    board["unfinished"] = []
    if interrupted:
        for r in board["trials"]:
            if r["trial"] not in _ENDED and r["status"] == "stopped early":
                r["status"] = "unfinished"
                board["unfinished"].append(r["trial"])
    root.write_text(json.dumps(board, indent=1), "leaderboard.json")
    best = board["trials"][0] if board["trials"] and board["trials"][0].get("best") is not None else None
    if best and not board["unfinished"]:
        root.write_text(best_job_yaml(sw, best), "best_job.yaml")
        board["best_job"] = f"{sw.root}/best_job.yaml"
    return board


def _fit(tuner):
    """Run the sweep; also say whether Ctrl-C ended it. Tune then returns normally with the
    unfinished trials saved for --resume, and tells only through its SIGINT handler: on the first
    signal it puts back the handler it found, so finding ours back in place means it fired."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False

    def ours(sig, frame):  # a second Ctrl-C while Tune saves its state
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, ours)
    try:
        grid = tuner.fit()
        return grid, signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, previous)
