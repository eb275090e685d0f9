"""Turns a validated job spec into a Ray Train run: Ray start-up, datasets, trainer, storage.

`run` executes a job on the Ray cluster this process belongs to (an embedded local one when
there is none); `submit` in `rayganx.remote` sends it to a cluster through the Jobs API.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from rayganx import data as rdata
from rayganx.spec import JobSpec
from rayganx.storage import Store, is_remote, pyarrow_filesystem

log = logging.getLogger("rayganx")


class RunError(RuntimeError):
    """A run failed; the message is one line for the user."""


@dataclass
class RunResult:
    run_url: str
    steps: int
    metrics: dict = field(default_factory=dict)
    checkpoints: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    skipped_images: list = field(default_factory=list)


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
        # Logical CPUs are scheduling slots: leave one beyond the workers' for Ray Data's
        # decode tasks, or a fully booked machine would starve the input pipeline.
        ray.init(num_cpus=num_cpus or (os.cpu_count() or 2) + 1, include_dashboard=True, **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if not verbose:  # Ray Data logs each execution in the driver (data.cache materialises one)
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def ray_is_up() -> bool:
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def check_fits_locally(spec: JobSpec) -> None:
    """On the embedded cluster nothing autoscales: a job that cannot fit would wait forever."""
    import ray

    have = ray.cluster_resources()
    s = spec.scaling
    if s.use_gpu and have.get("GPU", 0) < s.num_workers * s.gpus_per_worker:
        raise RunError(f"scaling.use_gpu: {s.num_workers} workers x {s.gpus_per_worker:g} GPU requested, "
                       f"this machine has {have.get('GPU', 0):g}; submit to a GPU cluster with --address")
    if have.get("CPU", 0) < s.num_workers * s.cpus_per_worker:
        raise RunError(f"scaling: {s.num_workers} workers x {s.cpus_per_worker:g} CPU requested, the local "
                       f"Ray has {have.get('CPU', 0):g}; lower scaling.num_workers or submit with --address")


def seen_errors(err: BaseException) -> list[BaseException]:
    out, stack = [], [err]
    while stack:
        e = stack.pop()
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__,
                  getattr(e, "controller_failure", None), *getattr(e, "worker_failures", {}).values()]
    return out


def root_cause(err: BaseException) -> str:
    """The user-facing line inside Ray's layers of wrapping."""
    from rayganx.data import DataError
    from rayganx.metrics import EvalError
    from rayganx.storage import StorageError
    from rayganx.train import DivergenceError

    for e in seen_errors(err):
        if isinstance(e, (DataError, StorageError, DivergenceError, EvalError)):
            return str(e).splitlines()[0]
    # Ray Data re-raises worker errors as text: find our error's line in the whole chain.
    import re

    texts = [str(e) for e in seen_errors(err)]
    for text in texts:
        m = re.search(r"(?:DataError|StorageError|DivergenceError|EvalError): (.+)", text)
        if m:
            return m.group(1).strip()
    text = str(err).strip().splitlines()
    lines = [ln for ln in text if ln.strip() and not ln.startswith(" ")]
    return (lines[-1] if lines else type(err).__name__)[:500]


@dataclass
class Plan:
    """What a job needs decided before Ray starts (and fails fast on bad data or storage)."""

    num_classes: int | None
    total_steps: int
    split: str
    rows: int = 0
    real_features: object = None  # real-data features (a tensor) for evaluation


def plan(spec: JobSpec) -> Plan:
    Store(spec.storage.path, spec.storage.endpoint_url).check_writable()
    classifier = spec.model.kind == "cnn"
    num_classes = rdata.num_classes(spec.data) if classifier or spec.model.conditional else None
    split = "train" if classifier else "all"
    rows = rdata.count_rows(spec.data, split)
    if rows < spec.train.batch_size:
        raise RunError(f"data: {rows} images is fewer than one batch (train.batch_size={spec.train.batch_size})")
    total = spec.train.steps or spec.train.epochs * max(1, rows // spec.train.batch_size)
    if spec.eval.every:  # a missing or unreadable extractor fails here, before Ray starts
        from rayganx.metrics import load_extractor

        load_extractor(spec.eval, spec.data.channels, spec.storage.endpoint_url)
    return Plan(num_classes, total, split, rows)


def prepare_eval(spec: JobSpec, p: Plan) -> None:
    """Real-data features for evaluation, computed once per dataset and extractor (cached in storage).

    They travel in the train loop's config, not as a file: rank 0 may run on another node."""
    from rayganx.metrics import load_extractor, real_features

    p.real_features = real_features(spec, load_extractor(spec.eval, spec.data.channels, spec.storage.endpoint_url),
                                    spec.eval.num_samples)


def cache_decoded(spec: JobSpec, rows: int) -> bool:
    """Whether to keep the decoded dataset in the object store (data.cache)."""
    import ray

    d = spec.data
    if d.cache != "auto" or d.source == "gaussian_mixture":
        return d.cache is True
    size = rows * d.channels * d.image_size ** 2  # uint8 images
    return size <= ray.cluster_resources().get("object_store_memory", 0) / 4


def trainer_for(spec: JobSpec, p: Plan, callbacks=None, init_from: str | None = None):
    """The TorchTrainer for a job, with its datasets, storage and checkpoint policy.

    init_from: a checkpoint URL to start from when the run has no checkpoint of its own."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayganx.train import train_loop

    root = Store(spec.storage.path, spec.storage.endpoint_url)
    datasets = {"train": rdata.build(spec.data, p.split, seed=spec.train.seed)}
    if cache_decoded(spec, p.rows):
        # Decoding once instead of every epoch: the decode tasks otherwise share the CPUs with
        # training (0.85 -> 1.0 of plain PyTorch at 64 px on 2 cores, docs/performance.md).
        datasets["train"] = datasets["train"].materialize()
    if p.split == "train":
        datasets["val"] = rdata.build(spec.data, "val")

    run = Store(spec.run_url, spec.storage.endpoint_url)
    run.write_text(spec.to_yaml(), "spec.yaml")

    s = spec.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    best = spec.storage.keep_best_by
    storage = dict(storage_path=spec.storage.path)
    if is_remote(spec.storage.path):
        storage = dict(storage_path=root.root, storage_filesystem=pyarrow_filesystem(root.fs))
    from rayganx.spec import METRIC_MODES

    trainer = TorchTrainer(
        train_loop,
        # The spec object, not a dict: it keeps its ${VAR} placeholders for what workers store.
        train_loop_config={"spec": spec, "num_classes": p.num_classes,
                           "total_steps": p.total_steps, "real_features": p.real_features,
                           "init_from": init_from},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=resources, placement_strategy=s.placement_strategy),
        run_config=RunConfig(
            name=spec.name, **storage, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.storage.keep, checkpoint_score_attribute=best,
                checkpoint_score_order=METRIC_MODES.get(best, "max") if best else "max"),
            failure_config=FailureConfig(max_failures=s.max_failures)),
        datasets=datasets,
    )
    return trainer


class Progress:
    """Follows a run by reading its metrics.jsonl from storage; works for local and remote runs."""

    def __init__(self, spec: JobSpec, start_step: int, printer: Callable[[dict], None]):
        self.run = Store(spec.run_url, spec.storage.endpoint_url)
        self.seen, self.printer = start_step, printer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll_once()

    def _poll(self):
        while not self._stop.wait(1.0):
            try:
                self.poll_once()
            except Exception:  # progress display must never break the run
                pass

    def poll_once(self):
        from rayganx.storage import read_metrics

        for m in read_metrics(self.run):
            if m.get("step", 0) > self.seen:
                self.seen = m["step"]
                self.printer(m)


def last_step(spec: JobSpec) -> int:
    from rayganx.storage import list_checkpoints

    ckpts = list_checkpoints(Store(spec.run_url, spec.storage.endpoint_url))
    return ckpts[-1]["step"] if ckpts else 0


def resolve_paths(spec: JobSpec) -> JobSpec:
    """Absolute local paths: Ray workers run in their own working directories."""
    spec = spec.model_copy(deep=True)
    if not is_remote(spec.storage.path):
        spec.storage.path = os.path.abspath(os.path.expanduser(spec.storage.path))
    if spec.data.path and not is_remote(spec.data.path):
        spec.data.path = os.path.abspath(os.path.expanduser(spec.data.path))
    return spec


def run(spec: JobSpec, *, verbose: bool = False, printer: Callable[[dict], None] | None = None,
        on_start: Callable[[int, int], None] | None = None) -> RunResult:
    """Run a job to completion on the current (or an embedded) Ray cluster."""
    from rayganx.storage import list_checkpoints

    spec = resolve_paths(spec)
    p = plan(spec)
    embedded = not ray_is_up()
    init_ray(verbose=verbose)
    if embedded:
        check_fits_locally(spec)
    start = last_step(spec)
    if spec.eval.every:
        prepare_eval(spec, p)
    counter = None
    if spec.data.on_corrupt == "skip" and spec.data.source in ("image_folder", "parquet", "celeba"):
        counter = rdata.skip_counter()
    try:
        trainer = trainer_for(spec, p)  # with data.cache, the first decoding pass runs here
        if on_start:
            on_start(start, p.total_steps)
        with Progress(spec, start, printer or (lambda m: None)):
            trainer.fit()
    except Exception as e:
        raise RunError(root_cause(e)) from e
    run_store = Store(spec.run_url, spec.storage.endpoint_url)
    ckpts = list_checkpoints(run_store)
    samples = sorted(f["name"] for f in run_store.listdir("samples"))
    from rayganx.storage import read_metrics

    history = read_metrics(run_store)
    skipped = []
    if counter is not None:
        import ray

        skipped = ray.get(counter.get.remote())
        ray.kill(counter)
    return RunResult(run_url=spec.run_url, steps=history[-1]["step"] if history else start,
                     metrics=history[-1] if history else {}, checkpoints=ckpts, samples=samples,
                     skipped_images=skipped)
