"""Ray Tune sweeps: a search space over job keys, ASHA or Population Based Training.

Each trial is a full rayganx job. Its Tune function trainable is only a driver: it builds the
job's TorchTrainer and runs it (the Train V2 pattern; `Tuner(TorchTrainer)` is deprecated),
and forwards every checkpointed report to Tune with a small pointer checkpoint naming the
job's own checkpoint. Tune (and PBT's exploit) restores a trial from that pointer; the job
loads the named checkpoint and takes its learning rates and betas from the trial's config.

Layout under <storage>/<sweep name>/: one run per trial (trial_00000/, ... with checkpoints,
samples and metrics/ as for any job), Tune's experiment state in tune/, and at the end
leaderboard.json and best_job.yaml.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import logging
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import Field, ValidationError

from rayganx import spec as jobspec
from rayganx.spec import METRIC_MODES, JobSpec, SpecError, _Section
from rayganx.storage import Store, is_remote

# Values a sweep can sample. Anything else in `space` is a constant for every trial.
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")

# Sweep-level keys that set several job keys at once: the usual GAN-stability knobs are not
# single job keys (a D/G learning-rate ratio, WGAN-GP as a loss, one beta for both optimisers).
RECIPE = {
    "recipe.loss": "non_saturating | hinge | least_squares | wgan_gp (wasserstein + gradient penalty, "
                   "discriminator without BatchNorm)",
    "recipe.gp_lambda": "gradient-penalty weight used when recipe.loss is wgan_gp (default 10)",
    "recipe.lr_ratio": "discriminator learning rate = ratio x train.optim_g.lr",
    "recipe.beta1": "Adam beta1 of both optimisers",
    "recipe.beta2": "Adam beta2 of both optimisers",
    "recipe.spectral_norm": "true: spectral norm in the discriminator; false: none",
    "recipe.diffaug": "true: DiffAugment translation, color and cutout; false: none",
}

# Keys PBT may change in a running trial: the donor's weights must still load.
PBT_MUTABLE = ("train.", "recipe.lr_ratio", "recipe.beta1", "recipe.beta2", "recipe.diffaug", "recipe.gp_lambda")

DEFAULT_SPACES = {"gan_stability": """\
# gan_stability: the hyperparameters that decide whether a GAN trains at all (Lucic et al. 2018,
# Kurach et al. 2019). Include it by name (include: [gan_stability]); keys in your own `space` win.
recipe.loss: {choice: [non_saturating, hinge, wgan_gp]}
train.optim_g.lr: {loguniform: [1.0e-5, 1.0e-3]}     # generator learning rate
recipe.lr_ratio: {choice: [1, 2, 4]}                 # discriminator lr / generator lr (TTUR)
recipe.beta1: {choice: [0.0, 0.5]}
recipe.beta2: {choice: [0.9, 0.999]}
train.d_steps: {choice: [1, 2, 5]}                   # discriminator steps per generator step
recipe.spectral_norm: {choice: [false, true]}
recipe.gp_lambda: {loguniform: [0.1, 100.0]}         # used by wgan_gp only
train.r1_gamma: {choice: [0.0, 0.1, 1.0, 10.0]}      # 0: no R1 penalty
train.ema_decay: {choice: [null, 0.999, 0.9999]}     # null: no EMA generator
recipe.diffaug: {choice: [false, true]}
train.batch_size: {choice: [32, 64, 128]}
train.seed: {randint: [0, 10000]}
"""}


class SchedulerSpec(_Section):
    kind: Literal["fifo", "asha", "pbt"] = "asha"
    max_steps: int | None = Field(None, ge=1, description="steps of a full trial (default: the job's train.steps)")
    grace_period: int = Field(100, ge=1, description="ASHA: steps before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor at each rung")
    perturbation_interval: int | None = Field(None, ge=1, description="PBT: steps between exploits "
                                                                       "(default: 2 x report_every)")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="PBT: bottom fraction that exploits the top")
    resample_probability: float = Field(0.25, ge=0, le=1, description="PBT: resample instead of perturb")
    synch: bool = Field(False, description="PBT: wait for every trial at each interval (all must run at once)")
    mutations: dict[str, Any] | None = Field(None, description="PBT: keys and distributions to mutate "
                                                                "(default: the sampled keys of `space`)")


class SweepSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    job: str | dict = Field(description="the base job: a job YAML path (relative to the sweep file) or inline")
    include: list[Literal[tuple(DEFAULT_SPACES)]] = Field(default_factory=list)  # type: ignore[valid-type]
    space: dict[str, Any] = Field(default_factory=dict)
    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    report_every: int = Field(100, ge=1, description="steps between a trial's reports (each one checkpoints)")
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    storage: str | None = Field(None, description="where the sweep goes (default: the job's storage.path)")


class Sweep:
    """A validated sweep: the spec, the base job (raw and checked) and the merged space."""

    def __init__(self, spec: SweepSpec, base_raw: dict, base: JobSpec, source: str):
        self.spec, self.base_raw, self.base, self.source = spec, base_raw, base, source
        self.space: dict[str, Any] = {}
        for name in spec.include:
            self.space |= yaml.safe_load(DEFAULT_SPACES[name])
        self.space |= spec.space
        s = spec.scheduler
        self.max_steps = s.max_steps or base.train.steps
        self.metric = spec.metric or default_metric(base)
        self.mode = spec.mode or METRIC_MODES.get(self.metric) or "max"
        self.interval = s.perturbation_interval or 2 * spec.report_every
        mutations = s.mutations if s.mutations is not None else {
            k: v for k, v in self.space.items() if _is_distribution(v) and "grid" not in v}
        self.mutations = mutations if s.kind == "pbt" else {}

    @property
    def workers_per_trial(self) -> int:
        """The most Train workers one trial can ask for."""
        workers = self.space.get("scaling.num_workers", self.base.scaling.num_workers)
        return max(_check_distribution("scaling.num_workers", workers)) if _is_distribution(workers) else workers

    @property
    def storage(self) -> str:
        return self.spec.storage or self.base.storage.path

    @property
    def root(self) -> str:
        """<storage>/<sweep name>: the trials' runs, Tune's state, the leaderboard."""
        return self.storage.rstrip("/") + "/" + self.spec.name

    def trial_spec(self, config: dict, trial: str) -> JobSpec:
        """The job one trial runs: the base job with the trial's values and the sweep's reporting."""
        raw = copy.deepcopy(self.base_raw)
        recipe = {k: v for k, v in config.items() if k.startswith("recipe.")}
        for key, value in config.items():
            if not key.startswith("recipe."):
                jobspec.set_dotted(raw, key, value)
        _apply_recipe(raw, recipe)
        every = self.spec.report_every
        jobspec.set_dotted(raw, "name", trial)
        jobspec.set_dotted(raw, "storage.path", self.root)
        jobspec.set_dotted(raw, "storage.checkpoint_every", every)
        jobspec.set_dotted(raw, "train.steps", self.max_steps)
        jobspec.set_dotted(raw, "train.epochs", None)
        if self.metric in EVAL_METRICS:
            jobspec.set_dotted(raw, "eval.every", every)
            metrics = raw.get("eval", {}).get("metrics") or ["fid", "kid"]
            name = "pr" if self.metric in ("precision", "recall") else self.metric
            jobspec.set_dotted(raw, "eval.metrics", metrics if name in metrics else [*metrics, name])
        if self.metric in METRIC_MODES and METRIC_MODES[self.metric] == self.mode:
            jobspec.set_dotted(raw, "storage.keep_best_by", self.metric)  # keeps the best checkpoint
        if self.spec.scheduler.kind == "pbt":
            # A donor's checkpoint must outlive the time its exploiter takes to start.
            keep = raw.get("storage", {}).get("keep") or 2
            jobspec.set_dotted(raw, "storage.keep", max(keep, 4))
        return jobspec.from_dict(raw, f"{self.source} ({trial})")


EVAL_METRICS = ("fid", "kid", "is", "precision", "recall")


def default_metric(base: JobSpec) -> str:
    if base.is_gan:
        if base.eval.every:
            return "fid"
        raise SpecError("metric: the base job does not evaluate (eval.every unset); name the metric to rank "
                        "trials by: fid (evaluates at every report) or a training metric such as loss_g")
    return {"cnn": "val_accuracy", "vae": "elbo"}[base.model.kind]


def _apply_recipe(raw: dict, recipe: dict) -> None:
    if not recipe:
        return
    sd = lambda k, v: jobspec.set_dotted(raw, k, v)  # noqa: E731
    try:  # the job's current values, defaults included, to change one part of them
        cur = JobSpec.model_validate(raw)
    except ValidationError:
        return  # from_dict reports what is wrong with the job itself
    t = cur.train
    if "recipe.loss" in recipe:
        loss = recipe["recipe.loss"]
        if loss == "wgan_gp":
            sd("train.loss", "wasserstein")
            sd("train.gp_lambda", recipe.get("recipe.gp_lambda", t.gp_lambda or 10.0))
            sd("model.d_batchnorm", False)
        else:
            sd("train.loss", loss)
            sd("train.gp_lambda", 0.0)
    elif "recipe.gp_lambda" in recipe and t.gp_lambda:
        sd("train.gp_lambda", recipe["recipe.gp_lambda"])
    opts = ("optim_g", "optim_d") if cur.is_gan else ("optim",)
    for i, key in enumerate(("recipe.beta1", "recipe.beta2")):
        if key in recipe:
            for opt in opts:
                betas = list(getattr(t, opt).betas)
                betas[i] = recipe[key]
                sd(f"train.{opt}.betas", betas)
    if "recipe.lr_ratio" in recipe:
        sd("train.optim_d.lr", t.optim_g.lr * float(recipe["recipe.lr_ratio"]))
    if "recipe.spectral_norm" in recipe:
        sd("model.spectral_norm", "d" if recipe["recipe.spectral_norm"] else "none")
    if "recipe.diffaug" in recipe:
        sd("train.diffaug", ["translation", "color", "cutout"] if recipe["recipe.diffaug"] else [])


# --------------------------------------------------------------------------- loading and checks


def _is_distribution(v: Any) -> bool:
    return isinstance(v, dict) and len(v) == 1 and next(iter(v)) in DISTRIBUTIONS


def _check_distribution(where: str, v: Any) -> list:
    """The values a distribution can produce at its corners (for probing the job spec)."""
    if not _is_distribution(v):
        if isinstance(v, dict):
            raise SpecError(f"{where}: expected a value or one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, "
                            f"got {v!r}")
        return [v]
    kind, args = next(iter(v.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise SpecError(f"{where}.{kind}: expected a non-empty list of values, got {args!r}")
        return args
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise SpecError(f"{where}.{kind}: expected [low, high], got {args!r}")
    lo, hi = args
    if not lo < hi:
        raise SpecError(f"{where}.{kind}: low must be below high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise SpecError(f"{where}.loguniform: bounds must be positive, got [{lo}, {hi}]")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise SpecError(f"{where}.randint: expected integer bounds [low, high), got {args!r}")
        return [lo, hi - 1]
    return [lo, hi]


def _check_key(where: str, key: str) -> None:
    valid = jobspec.job_keys() + list(RECIPE)
    if key in valid:
        return
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "expected a job key such as train.optim_g.lr or a recipe.* key"
    raise SpecError(f"{where}: unknown key '{key}' ({hint})")


def load(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep before any trial starts: its keys, its values against the job spec."""
    path = Path(path)
    raw = jobspec.load_yaml(path)
    for key, value in jobspec.parse_overrides(overrides):
        jobspec.set_dotted(raw, key, value)
    return from_dict(raw, str(path), path.parent)


def from_dict(raw: dict, source: str = "<sweep>", base_dir: Path | None = None) -> Sweep:
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError("\n".join(f"{source}: {jobspec.describe_error(err, SweepSpec)}" for err in e.errors())) from None
    if isinstance(spec.job, str):
        candidates = [Path(spec.job)] if Path(spec.job).is_absolute() else [
            (base_dir or Path.cwd()) / spec.job, Path(spec.job)]
        found = next((p for p in candidates if p.is_file()), None)
        if not found:
            raise SpecError(f"{source}: job: no such job file {spec.job!r} (looked in "
                            f"{', '.join(sorted({str(c.parent.resolve()) for c in candidates}))})")
        base_raw, base_source = jobspec.load_yaml(found), str(found)
    else:
        base_raw, base_source = spec.job, f"{source} (job)"
    base = jobspec.from_dict(base_raw, base_source)
    try:
        sweep = Sweep(spec, base_raw, base, source)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    problems = _check(sweep)
    if problems:
        raise SpecError("\n".join(f"{source}: {p}" for p in problems))
    return sweep


def _check(sw: Sweep) -> list[str]:
    s, p = sw.spec, []
    corners = {}
    for key, v in sw.space.items():
        try:
            _check_key(f"space.{key}", key)
            corners[key] = _check_distribution(f"space.{key}", v)
        except SpecError as e:
            p.append(str(e))
    for key, v in sw.mutations.items():
        try:
            _check_key(f"scheduler.mutations.{key}", key)
            _check_distribution(f"scheduler.mutations.{key}", v)
        except SpecError as e:
            p.append(str(e))
            continue
        if not key.startswith(PBT_MUTABLE):
            p.append(f"scheduler.mutations.{key}: PBT can only mutate training hyperparameters (train.*, "
                     f"recipe.lr_ratio, recipe.beta1/beta2, recipe.diffaug, recipe.gp_lambda): a changed "
                     f"model or dataset cannot load the donor's checkpoint")
    if not sw.max_steps:
        p.append("scheduler.max_steps: required when the base job counts train.epochs")
    elif sw.max_steps < s.report_every:
        p.append(f"report_every: {s.report_every} is more than a trial's {sw.max_steps} steps")
    known = set(METRIC_MODES) | {"loss_d", "loss_g", "d_real", "d_fake", "loss", "accuracy", "recon", "kl"}
    if sw.metric not in known:
        close = difflib.get_close_matches(sw.metric, sorted(known), n=1)
        p.append(f"metric: unknown metric {sw.metric!r}" + (f" (did you mean '{close[0]}'?)" if close else
                                                            f"; expected one of {', '.join(sorted(known))}"))
    if sw.metric in EVAL_METRICS and not (sw.base.is_gan or sw.base.model.kind == "vae"):
        p.append(f"metric: {sw.metric} evaluates generated images; the base job is a {sw.base.model.kind}")
    sched = s.scheduler
    if sched.kind == "asha" and sched.grace_period < s.report_every:
        p.append(f"scheduler.grace_period: {sched.grace_period} is shorter than report_every={s.report_every}; "
                 f"trials are only compared when they report")
    if sched.kind == "pbt":
        if sw.interval % s.report_every:
            p.append(f"scheduler.perturbation_interval: {sw.interval} must be a multiple of report_every="
                     f"{s.report_every} (trials exploit at reported checkpoints)")
        if not sw.mutations:
            p.append("scheduler.mutations: PBT needs at least one key to mutate")
        if s.search != "random":
            p.append(f"search: PBT draws its own perturbations; use search: random, not {s.search}")
    if s.search == "grid":
        for key, v in sw.space.items():
            if _is_distribution(v) and next(iter(v)) not in ("choice", "grid"):
                p.append(f"space.{key}: search: grid needs a finite list (choice or grid), got {next(iter(v))}")
    if s.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            p.append("search: optuna is not installed (pip install optuna)")
        if any(_is_distribution(v) and "grid" in v for v in sw.space.values()):
            p.append("search: optuna does not take grid values; use choice")
    if p:
        return p
    return _probe(sw, corners)


def _probe(sw: Sweep, corners: dict[str, list]) -> list[str]:
    """Resolve trial specs at the corners of the space, so a value the job rejects fails now."""
    keys = list(corners)
    combos = math.prod(len(v) for v in corners.values()) if corners else 1
    if combos <= 256:
        probes = [dict(zip(keys, values)) for values in itertools.product(*corners.values())]
    else:  # each value of each key once, the other keys at their first value
        first = {k: v[0] for k, v in corners.items()}
        probes = [first | {k: value} for k in keys for value in corners[k]]
    for mkey, v in sw.mutations.items():
        probes += [probes[0] | {mkey: value} for value in _check_distribution(mkey, v)]
    for config in probes:
        try:
            sw.trial_spec(config, "probe")
        except SpecError as e:
            detail = str(e).split(": ", 1)[-1].replace("(probe): ", "")
            varied = ", ".join(f"space.{k}={v!r}" for k, v in config.items() if len(corners.get(k, [0, 0])) > 1)
            return [f"{varied or 'space'}: the job spec rejects this trial: {detail}"]
    return []


def default_spaces_yaml() -> str:
    recipe = "\n".join(f"#   {k}: {v}" for k, v in RECIPE.items())
    return (DEFAULT_SPACES["gan_stability"] + "\n# recipe.* keys set several job keys at once:\n" + recipe + "\n")


# --------------------------------------------------------------------------- running


def _trial_name(trial_id: str) -> str:
    return "trial_" + trial_id.rsplit("_", 1)[-1]


def _tune_domain(v: Any):
    from ray import tune

    if not _is_distribution(v):
        return v
    kind, args = next(iter(v.items()))
    return {"choice": lambda: tune.choice(args), "grid": lambda: tune.grid_search(args),
            "uniform": lambda: tune.uniform(*args), "loguniform": lambda: tune.loguniform(*args),
            "randint": lambda: tune.randint(*args)}[kind]()


def _param_space(sw: Sweep) -> dict:
    space = {}
    for k, v in sw.space.items():
        if sw.spec.search == "grid" and _is_distribution(v):
            v = {"grid": next(iter(v.values()))}
        space[k] = _tune_domain(v)
    for k, v in sw.mutations.items():
        space.setdefault(k, _tune_domain(v))
    return space


def _to_tune_callback(queue):
    """A Ray Train callback, run in the Train controller, that passes each report to the driver."""
    from ray.train import UserCallback

    class ToTune(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            queue.put((metrics[0], checkpoint is not None))

    return ToTune()


def _restore_point(spec: JobSpec, restored) -> str | None:
    """The checkpoint a restored trial starts from (None: Ray Train resumes the trial's own run).

    Tune restores a trial from the pointer it last reported: its own run after --resume or a
    pause, another trial's for a PBT exploit. Its own run resumes from its newest checkpoint. A
    donor's named checkpoint may have been pruned since (storage.keep), or not be complete yet:
    then the donor's newest complete one."""
    from rayganx.storage import list_checkpoints

    if not restored:
        return None
    with restored.as_directory() as d:
        url = json.loads(Path(d, "pointer.json").read_text())["checkpoint"]
    run_url = url.rstrip("/").rsplit("/", 1)[0]
    if run_url == spec.run_url:
        return None
    # Only complete checkpoints count: the named one may still be uploading, or pruned since.
    ckpts = list_checkpoints(Store(run_url, spec.storage.endpoint_url))
    if not any(c["url"].rstrip("/") == url.rstrip("/") for c in ckpts) and ckpts:
        url = ckpts[-1]["url"]
    # Ray Train still offers the trial's own newest checkpoint; train.restore prefers this one
    # unless Ray's was written after restoring from it (see its lineage).
    return url


def _write_hparams(spec: JobSpec, config: dict, metrics: list[str], **kwargs) -> None:
    """TensorBoard's HParams view is a convenience: a store hiccup here must neither fail a trial
    nor mask the error it failed with."""
    from rayganx import tracking

    try:
        tracking.write_hparams(spec.run_url, spec.storage.endpoint_url, config, metrics, **kwargs)
    except Exception as e:  # noqa: BLE001
        logging.getLogger("rayganx").warning("%s: no HParams session written (%s)", spec.run_url, e)


def _trial(config: dict, sweep_raw: dict, source: str) -> None:
    """The Tune function trainable: drives one trial's TorchTrainer."""
    from ray import tune
    from ray.util.queue import Queue

    from rayganx import runner

    sw = from_dict(sweep_raw, source)  # the base job travels inline
    spec = runner.resolve_paths(sw.trial_spec(config, _trial_name(tune.get_context().get_trial_id())))
    p = runner.plan(spec)
    if spec.eval.every:
        runner.prepare_eval(spec, p)
    init_from = _restore_point(spec, tune.get_checkpoint())
    hp_metrics = list(dict.fromkeys([sw.metric, *(("loss_d", "loss_g") if spec.is_gan else ("loss",))]))
    _write_hparams(spec, config, hp_metrics)
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = runner.trainer_for(spec, p, callbacks=[_to_tune_callback(queue)], init_from=init_from)
    failure: list[BaseException] = []

    def fit():
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            failure.append(e)
        finally:
            queue.put(None)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    while (item := queue.get()) is not None:
        metrics, checkpointed = item
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
        if not checkpointed:
            tune.report(report)
            continue
        with tempfile.TemporaryDirectory() as d:
            url = f"{spec.run_url}/checkpoint_{metrics['step']:06d}"
            Path(d, "pointer.json").write_text(json.dumps({"checkpoint": url, "step": metrics["step"]}))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
    thread.join()
    _write_hparams(spec, config, hp_metrics, status="failure" if failure else "success")
    if failure:
        raise runner.RunError(runner.root_cause(failure[0])) from failure[0]


_PRINTER: list[Callable] = [lambda *a: None]  # module state: Tune pickles its callbacks with the sweep
_ENDED: set[str] = set()  # trials that finished, stopped or failed in this process


def _events_callback():
    """A Tune callback that hands trial events to the caller's printer (the CLI's live table)."""
    from ray.tune import Callback

    def printer(*args):
        # Looked up at call time: Tune pickles its callbacks, and the printer (a live terminal
        # table) must not travel with them.
        from rayganx import tune as this

        if args[1] in ("ended", "error"):
            this._ENDED.add(args[0])
        this._PRINTER[0](*args)

    class Events(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            printer(_trial_name(trial.trial_id), "running", None, trial.config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            printer(_trial_name(trial.trial_id), "running", result, trial.config)

        def on_trial_complete(self, iteration, trials, trial, **info):
            printer(_trial_name(trial.trial_id), "ended", None, trial.config)

        def on_trial_error(self, iteration, trials, trial, **info):
            printer(_trial_name(trial.trial_id), "error", None, trial.config)

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
        fit = int((have.get("CPU", 1) - 1) // (workers * s.cpus_per_worker))
    if len(ray.nodes()) > 1:
        return want or max(1, fit)
    from rayganx.runner import RunError

    if fit < 1:
        raise RunError(f"scaling: one trial needs {workers} workers x {s.cpus_per_worker:g} CPU plus a CPU for "
                       f"Ray Data; this Ray has {have.get('CPU', 0):g}. Lower scaling.num_workers in the space, "
                       f"or run on a cluster with --address")
    if want and want > fit:
        raise RunError(f"max_concurrent_trials: {want} trials x {workers} workers do not fit this Ray "
                       f"({have.get('CPU', 0):g} CPUs, one kept for Ray Data); at most {fit}")
    return want or fit


def run(sw: Sweep, *, resume: bool = False, verbose: bool = False,
        printer: Callable[[str, str, dict | None, dict], None] | None = None) -> dict:
    """Run a sweep to completion; returns the leaderboard (also written to storage)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    from rayganx import runner
    from rayganx.storage import ray_storage

    if not is_remote(sw.storage):
        sw.spec.storage = os.path.abspath(os.path.expanduser(sw.storage))
    root = Store(sw.root, sw.base.storage.endpoint_url)
    root.check_writable()
    exists = root.exists("tune")
    if exists and not resume:
        raise runner.RunError(f"sweep {sw.spec.name} already exists at {sw.root}; pass --resume to continue it, "
                              f"or change its name")
    if resume and not exists:
        raise runner.RunError(f"--resume: no sweep {sw.spec.name} at {sw.root} to continue")

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
    runner.init_ray(verbose=verbose)
    _PRINTER[0] = printer or (lambda *a: None)
    # Trials run in their own working directories: local paths must be absolute here.
    base_raw = copy.deepcopy(sw.base_raw)
    for section, key in (("data", "path"), ("eval", "extractor")):
        value = getattr(getattr(sw.base, section), key)
        if value and not is_remote(value):
            jobspec.set_dotted(base_raw, f"{section}.{key}", os.path.abspath(os.path.expanduser(value)))
    syn = sw.base.data.synthetic
    if syn and not is_remote(syn.generator):
        jobspec.set_dotted(base_raw, "data.synthetic.generator", os.path.abspath(os.path.expanduser(syn.generator)))
    raw = sw.spec.model_dump(mode="json") | {"job": base_raw}
    trainable = tune.with_parameters(_trial, sweep_raw=raw, source=sw.source)
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
        trial_name_creator=lambda t: _trial_name(t.trial_id),
        trial_dirname_creator=lambda t: _trial_name(t.trial_id))
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


def leaderboard(sw: Sweep, grid) -> dict:
    """Trials ranked by their best reported metric (read from each trial's metrics log)."""
    from rayganx.runner import root_cause
    from rayganx.storage import list_checkpoints, read_metrics

    rows = []
    for result in grid:
        name = os.path.basename(result.path.rstrip("/"))
        run = Store(f"{sw.root}/{name}", sw.base.storage.endpoint_url)
        history = read_metrics(run)
        # What Tune saw: the rows at report steps (the last one included).
        reported = [m for m in history if m["step"] % sw.spec.report_every == 0 or m["step"] == sw.max_steps]
        scored = [m for m in reported if isinstance(m.get(sw.metric), (int, float))]
        best = (min if sw.mode == "min" else max)(scored, key=lambda m: m[sw.metric]) if scored else None
        row = {"trial": name, "config": result.config, "step": history[-1]["step"] if history else 0,
               "best": best[sw.metric] if best else None, "best_step": best["step"] if best else None,
               "run": f"{sw.root}/{name}"}
        if result.error:
            row["status"] = "error: " + root_cause(result.error)
        else:
            row["status"] = "finished" if row["step"] >= sw.max_steps else "stopped early"
        ckpts = list_checkpoints(run)
        pick = [c for c in ckpts if c["step"] == row["best_step"]] or ckpts[-1:]
        row["checkpoint"] = pick[0]["url"] if pick else None
        rows.append(row)
    sign = 1 if sw.mode == "min" else -1
    rows.sort(key=lambda r: (r["best"] is None, sign * r["best"] if r["best"] is not None else 0, r["trial"]))
    return {"sweep": sw.spec.name, "metric": sw.metric, "mode": sw.mode, "root": sw.root, "trials": rows}


def best_job_yaml(sw: Sweep, best: dict) -> str:
    """The best trial's job at the base job's full budget, as a job `rayganx submit` accepts."""
    spec = sw.trial_spec(best["config"], f"{sw.spec.name}-best")
    raw = spec.to_dict()
    raw["storage"]["path"] = sw.base.storage.path
    raw["storage"]["checkpoint_every"] = sw.base.storage.checkpoint_every
    raw["train"]["steps"], raw["train"]["epochs"] = sw.base.train.steps, sw.base.train.epochs
    if raw["eval"]["every"] and raw["storage"]["checkpoint_every"] % raw["eval"]["every"]:
        raw["eval"]["every"] = math.gcd(raw["eval"]["every"], raw["storage"]["checkpoint_every"])
    jobspec.from_dict(raw, "best_job.yaml")  # it must be a valid job
    header = (f"# Best trial of sweep {sw.spec.name}: {best['trial']}, {sw.metric} {best['best']:.6g} at step "
              f"{best['best_step']}.\n# Its checkpoint: {best['checkpoint']}\n"
              f"# Train it at the full budget: rayganx submit best_job.yaml\n")
    return header + yaml.safe_dump(raw, sort_keys=False)
