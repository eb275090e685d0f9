"""The sweep file: its schema, the search space over job keys, and the checks made before any
trial starts (keys, value ranges, and the job spec at the corners of the space).

A sweep names a base job and a `space` of job keys (or recipe.* keys, which set several job
keys at once) with distributions; `Sweep.trial_spec` turns one sampled point into the job a
trial runs. Running it is `rayganx.sweeps.tune`'s part.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from rayganx.job import spec as jobspec
from rayganx.job.config import describe_error, expand_env, job_keys, load_yaml, parse_overrides, set_dotted
from rayganx.job.metric_names import EVAL_RESULTS, METRIC_MODES, metric_reporting
from rayganx.job.spec import JobSpec, SpecError
from rayganx.job.sections import Section

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


class SchedulerSpec(Section):
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


class SweepSpec(Section):
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
            k: v for k, v in self.space.items() if is_distribution(v) and "grid" not in v}
        self.mutations = mutations if s.kind == "pbt" else {}

    @property
    def workers_per_trial(self) -> int:
        """The most Train workers one trial can ask for."""
        workers = self.space.get("scaling.num_workers", self.base.scaling.max_workers)
        if is_distribution(workers):
            return max(max(v) if isinstance(v, (list, tuple)) else v
                       for v in distribution_values("scaling.num_workers", workers))
        return max(workers) if isinstance(workers, (list, tuple)) else workers

    @property
    def storage(self) -> str:
        return self.spec.storage or self.base.storage.path

    @property
    def root(self) -> str:
        """<storage>/<sweep name>: the trials' runs, Tune's state, the leaderboard."""
        return self.storage.rstrip("/") + "/" + self.spec.name

    @property
    def eval_metric(self) -> str | None:
        """The evaluation metric behind the ranking metric (None: a training metric)."""
        if not (self.base.is_gan or self.base.model.kind == "vae"):
            return None
        return metric_reporting(self.metric, self.base.data.source == "gaussian_mixture")

    def trial_spec(self, config: dict, trial: str) -> JobSpec:
        """The job one trial runs: the base job with the trial's values and the sweep's reporting."""
        raw = copy.deepcopy(self.base_raw)
        recipe = {k: v for k, v in config.items() if k.startswith("recipe.")}
        for key, value in config.items():
            if not key.startswith("recipe."):
                set_dotted(raw, key, value)
        _apply_recipe(raw, recipe)
        every = self.spec.report_every
        set_dotted(raw, "name", trial)
        set_dotted(raw, "storage.path", self.root)
        set_dotted(raw, "storage.checkpoint_every", every)
        set_dotted(raw, "train.steps", self.max_steps)
        set_dotted(raw, "train.epochs", None)
        name = self.eval_metric
        if name:
            set_dotted(raw, "eval.every", every)
            metrics = raw.get("eval", {}).get("metrics") or list(self.base.eval.metrics)
            set_dotted(raw, "eval.metrics", metrics if name in metrics else [*metrics, name])
        if self.metric in METRIC_MODES and METRIC_MODES[self.metric] == self.mode:
            set_dotted(raw, "storage.keep_best_by", self.metric)  # keeps the best checkpoint
        if self.spec.scheduler.kind == "pbt":
            # A donor's checkpoint must outlive the time its exploiter takes to start.
            keep = raw.get("storage", {}).get("keep") or 2
            set_dotted(raw, "storage.keep", max(keep, 4))
        return jobspec.from_dict(raw, f"{self.source} ({trial})")


def default_metric(base: JobSpec) -> str:
    if base.is_gan:
        if base.eval.every:
            return "modes" if base.data.source == "gaussian_mixture" else "fid"
        raise SpecError("metric: the base job does not evaluate (eval.every unset); name the metric to rank "
                        "trials by: fid (evaluates at every report) or a training metric such as loss_g")
    return {"cnn": "val_accuracy", "vae": "elbo"}[base.model.kind]


def _apply_recipe(raw: dict, recipe: dict) -> None:
    if not recipe:
        return
    sd = lambda k, v: set_dotted(raw, k, v)  # noqa: E731
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
    if "recipe.beta1" in recipe or "recipe.beta2" in recipe:  # one write: both keys may be set
        for opt in opts:
            b1, b2 = getattr(t, opt).betas
            sd(f"train.{opt}.betas", [recipe.get("recipe.beta1", b1), recipe.get("recipe.beta2", b2)])
    if "recipe.lr_ratio" in recipe:
        sd("train.optim_d.lr", t.optim_g.lr * float(recipe["recipe.lr_ratio"]))
    if "recipe.spectral_norm" in recipe:
        sd("model.spectral_norm", "d" if recipe["recipe.spectral_norm"] else "none")
    if "recipe.diffaug" in recipe:
        sd("train.diffaug", ["translation", "color", "cutout"] if recipe["recipe.diffaug"] else [])


# --------------------------------------------------------------------------- loading and checks


def is_distribution(v: Any) -> bool:
    return isinstance(v, dict) and len(v) == 1 and next(iter(v)) in DISTRIBUTIONS


def distribution_values(where: str, v: Any) -> list:
    """The values a distribution can produce at its corners (for probing the job spec)."""
    if not is_distribution(v):
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
    valid = job_keys(JobSpec) + list(RECIPE)
    if key in valid:
        return
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "expected a job key such as train.optim_g.lr or a recipe.* key"
    raise SpecError(f"{where}: unknown key '{key}' ({hint})")


def load(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep before any trial starts: its keys, its values against the job spec."""
    path = Path(path)
    raw = load_yaml(path)
    for key, value in parse_overrides(overrides):
        set_dotted(raw, key, value)
    return from_dict(raw, str(path), path.parent)


def from_dict(raw: dict, source: str = "<sweep>", base_dir: Path | None = None) -> Sweep:
    # ${VAR} in the sweep's own keys as in a job's (the base job expands its own, keeping its placeholders).
    try:
        raw = expand_env({k: v for k, v in raw.items() if k != "job"}) | ({"job": raw["job"]} if "job" in raw else {})
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError("\n".join(f"{source}: {describe_error(err, SweepSpec)}" for err in e.errors())) from None
    if isinstance(spec.job, str):
        candidates = [Path(spec.job)] if Path(spec.job).is_absolute() else [
            (base_dir or Path.cwd()) / spec.job, Path(spec.job)]
        found = next((p for p in candidates if p.is_file()), None)
        if not found:
            raise SpecError(f"{source}: job: no such job file {spec.job!r} (looked in "
                            f"{', '.join(sorted({str(c.parent.resolve()) for c in candidates}))})")
        base_raw, base_source = load_yaml(found), str(found)
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
            corners[key] = distribution_values(f"space.{key}", v)
        except SpecError as e:
            p.append(str(e))
    for key, v in sw.mutations.items():
        try:
            _check_key(f"scheduler.mutations.{key}", key)
            distribution_values(f"scheduler.mutations.{key}", v)
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
    if sw.metric in EVAL_RESULTS and not (sw.base.is_gan or sw.base.model.kind == "vae"):
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
            if is_distribution(v) and next(iter(v)) not in ("choice", "grid"):
                p.append(f"space.{key}: search: grid needs a finite list (choice or grid), got {next(iter(v))}")
    if s.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            p.append("search: optuna is not installed (pip install optuna)")
        if any(is_distribution(v) and "grid" in v for v in sw.space.values()):
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
        probes += [probes[0] | {mkey: value} for value in distribution_values(mkey, v)]
    for point in probes:
        try:
            sw.trial_spec(point, "probe")
        except SpecError as e:
            detail = str(e).split(": ", 1)[-1].replace("(probe): ", "")
            varied = ", ".join(f"space.{k}={v!r}" for k, v in point.items() if len(corners.get(k, [0, 0])) > 1)
            return [f"{varied or 'space'}: the job spec rejects this trial: {detail}"]
    return []


def default_spaces_yaml() -> str:
    recipe = "\n".join(f"#   {k}: {v}" for k, v in RECIPE.items())
    return (DEFAULT_SPACES["gan_stability"] + "\n# recipe.* keys set several job keys at once:\n" + recipe + "\n")
