"""Turns a validated job spec into a Ray Train run: Ray start-up, datasets, trainer, storage.

`run` executes a job on the Ray cluster this process belongs to (an embedded local one when
there is none); `submit` in `rayganx.ops.remote` sends it to a cluster through the Jobs API.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from rayganx.data import sources as rdata
from rayganx.job.cluster import init_ray, ray_is_up
from rayganx.job.errors import UserError
from rayganx.training.failures import failure_line
from rayganx.training.progress import Progress, monitor_skipped, run_monitor
from rayganx.store.pyarrow_fs import ray_storage
from rayganx.job.spec import JobSpec
from rayganx.training.stopping import fit_interruptibly, locked, shutdown_embedded_ray
from rayganx.store.storage import Store, absolute

log = logging.getLogger("rayganx")


class RunError(UserError, RuntimeError):
    """A run failed; the message is one line for the user."""


@dataclass
class RunResult:
    run_url: str
    steps: int
    metrics: dict = field(default_factory=dict)
    checkpoints: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    skipped_images: list | None = field(default_factory=list)  # None: unknown (the monitor was lost)
    rollbacks: list = field(default_factory=list)


def check_fits_locally(spec: JobSpec) -> None:
    """On the embedded cluster nothing autoscales: a job that cannot fit would wait forever."""
    import ray

    have = ray.cluster_resources()
    s = spec.scaling
    n = s.min_workers  # an elastic run starts with what fits, from MIN workers up
    if s.use_gpu and have.get("GPU", 0) < n * s.gpus_per_worker:
        raise RunError(f"scaling.use_gpu: {n} workers x {s.gpus_per_worker:g} GPU requested, "
                       f"this machine has {have.get('GPU', 0):g}; submit to a GPU cluster with --address")
    if have.get("CPU", 0) < n * s.cpus_per_worker:
        raise RunError(f"scaling: {n} workers x {s.cpus_per_worker:g} CPU requested, the local "
                       f"Ray has {have.get('CPU', 0):g}; lower scaling.num_workers or submit with --address")


@dataclass
class Plan:
    """What a job needs decided before Ray starts (and fails fast on bad data or storage)."""

    num_classes: int | None
    total_steps: int
    split: str
    rows: int = 0  # training rows of an epoch, generated ones (data.synthetic) included
    real_features: object = None  # real-data features (a tensor) for evaluation
    synthetic: object = None  # a checked data.synthetic (rayganx.data.synthetic.Source)
    cas_data: object = None  # eval.metrics cas: the real training and held-out images


def steps_for_epochs(spec: JobSpec, rows: int) -> int:
    """The generator (or optimiser) steps that make `train.epochs` passes over `rows`.

    An epoch is train.batch_size-row batches, the last partial one dropped. Every
    discriminator step takes a batch and a generator step reuses the last one's fakes, so a
    GAN's generator step consumes train.d_steps batches."""
    batches = spec.train.epochs * max(1, rows // spec.train.batch_size)
    return max(1, batches // (spec.train.d_steps if spec.is_gan else 1))


def plan(spec: JobSpec) -> Plan:
    Store(spec.storage.path, spec.storage.endpoint_url).check_writable()
    classifier = spec.model.kind == "cnn"
    num_classes = rdata.num_classes(spec.data) if classifier or spec.model.conditional else None
    split = "train" if classifier else "all"
    rows = rdata.count_rows(spec.data, split)
    synthetic = None
    if spec.data.synthetic:  # before Ray starts: a generator that cannot serve fails in one line
        from rayganx.data import synthetic as rsynthetic

        synthetic = rsynthetic.check(spec, rows, num_classes)
        rows += synthetic.rows
    if rows < spec.train.batch_size:
        raise RunError(f"data: {rows} images is fewer than one batch (train.batch_size={spec.train.batch_size})")
    total = spec.train.steps or steps_for_epochs(spec, rows)
    # A missing or unreadable extractor fails here, before Ray starts (2-D jobs use none).
    if spec.eval.every and spec.data.source != "gaussian_mixture":
        from rayganx.evaluation.extractors import load_extractor

        load_extractor(spec.eval, spec.data.channels, spec.storage.endpoint_url)
    return Plan(num_classes, total, split, rows, synthetic=synthetic)


def prepare_eval(spec: JobSpec, p: Plan) -> None:
    """Real-data features for evaluation, computed once per dataset and extractor (cached in storage).

    They travel in the train loop's config, not as a file: rank 0 may run on another node."""
    if spec.data.source == "gaussian_mixture":  # 2-D points are scored against the mixture's known modes
        return
    from rayganx.evaluation.extractors import load_extractor
    from rayganx.evaluation.metrics import real_splits
    from rayganx.evaluation.scoring import real_features

    if "cas" in spec.eval.metrics:
        p.cas_data = real_splits(spec)
    if any(n != "cas" for n in spec.eval.metrics):
        p.real_features = real_features(spec, load_extractor(spec.eval, spec.data.channels,
                                                             spec.storage.endpoint_url), spec.eval.num_samples)


def val_dataset(spec: JobSpec, p: Plan):
    """Classifiers: the held-out rows validation reads (no order: every row counts once)."""
    return {"val": rdata.build(spec.data, "val")} if p.split == "train" else {}


def data_config():
    """How the validation rows reach the workers (Ray Train's DataConfig, one change): split
    unequally. An equal split drops up to num_workers - 1 rows, and validation has no collective
    step per batch that needs equal shards, so every row counts once. (Training rows do not go
    through Ray Train's split: `rayganx.data.rows` orders them.)"""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    def ingest_options(preserve_order: bool | None = None) -> ExecutionOptions:
        # Ray's default ingest options, field by field: DataConfig.default_ingest_options() also
        # copies exclude_resources, whose setter Ray 2.60 deprecates, which printed a
        # RayDeprecationWarning into every run's output. The field is zero unless set, and
        # rayganx never sets it.
        ctx = DataContext.get_current().execution_options
        return ExecutionOptions(resource_limits=ctx.resource_limits, verbose_progress=ctx.verbose_progress,
                                preserve_order=ctx.preserve_order if preserve_order is None else preserve_order)

    class _RunDataConfig(DataConfig):
        default_ingest_options = staticmethod(ingest_options)  # "val", and any dataset not named below

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != "val"}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                ds = datasets["val"]
                ds = ds.copy(ds)
                if ds.name is None:
                    ds.set_name("val")
                ds.context.execution_options = self._resolve_execution_options("val")
                hints = worker_node_ids if self._enable_shard_locality else None
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i]["val"] = split
            return out

    return _RunDataConfig()


def trainer_for(spec: JobSpec, p: Plan, callbacks=None, init_from: str | None = None, monitor=None,
                lock_token: str | None = None):
    """The TorchTrainer for a job, with its rows, storage and checkpoint policy.

    init_from: a checkpoint URL to start from when the run has no checkpoint of its own.
    monitor: the run's `run_monitor()` actor, when something follows the run live.
    lock_token: the run lock held for it (`locked`): the workers write under it."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayganx.data import rows
    from rayganx.job.metric_names import METRIC_MODES
    from rayganx.training.loop import train_loop

    # With data.cache (and digits), the first decoding pass runs here.
    source = rows.source(spec, p.split, p.rows, counter=monitor, synthetic=p.synthetic)
    s = spec.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    best = spec.storage.keep_best_by
    elastic = {"elastic_resize_monitor_interval_s": s.resize_check_s} if s.elastic else {}
    trainer = TorchTrainer(
        train_loop,
        # The spec object, not a dict: it keeps its ${VAR} placeholders for what workers store.
        train_loop_config={"spec": spec, "num_classes": p.num_classes, "total_steps": p.total_steps,
                           "rows": source,
                           # a reference, not the array: at Inception scale it is ~800 MB per worker
                           "real_features": ray.put(p.real_features) if p.real_features is not None else None,
                           "cas_data": ray.put(p.cas_data) if p.cas_data is not None else None,
                           "init_from": init_from, "monitor": monitor, "lock_token": lock_token,
                           "faults": {k: v for k, v in os.environ.items() if k.startswith("RAYGANX_FAULT_")}},
        scaling_config=ScalingConfig(num_workers=s.worker_range if s.elastic else s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=resources, placement_strategy=s.placement_strategy,
                                     **elastic),
        run_config=RunConfig(
            name=spec.name, **tolerant(ray_storage(spec.storage.path, spec.storage.endpoint_url), spec),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.storage.keep, checkpoint_score_attribute=best,
                checkpoint_score_order=METRIC_MODES.get(best, "max") if best else "max"),
            failure_config=FailureConfig(max_failures=s.max_failures)),
        datasets=val_dataset(spec, p),
        dataset_config=data_config(),
    )
    return trainer


def tolerant(storage: dict, spec: JobSpec) -> dict:
    """Ray Train's storage arguments with an S3 store's filesystem retrying through outages."""
    import pyarrow.fs as pafs

    from rayganx.store.pyarrow_fs import pyarrow_filesystem
    from rayganx.store.uploads import tolerant_filesystem

    if isinstance(storage.get("storage_filesystem"), pafs.S3FileSystem):
        # Writes in the calling thread: the wrapper is called from pyarrow's IO threads, and a
        # background write from there waits on the pool it occupies.
        inner = pyarrow_filesystem(spec.storage.path, spec.storage.endpoint_url, background_writes=False)
        storage["storage_filesystem"] = tolerant_filesystem(inner, spec.run_url, spec.storage.outage_tolerance_s)
    return storage


def last_step(spec: JobSpec) -> int:
    from rayganx.store.runs import list_checkpoints

    ckpts = list_checkpoints(Store(spec.run_url, spec.storage.endpoint_url))
    return ckpts[-1]["step"] if ckpts else 0


def resolve_paths(spec: JobSpec) -> JobSpec:
    """Absolute local paths: Ray workers run in their own working directories."""
    spec = spec.model_copy(deep=True)
    for key, value in spec.paths().items():
        *sections, field = key.split(".")
        node = spec
        for name in sections:
            node = getattr(node, name)
        setattr(node, field, absolute(value))
    return spec


def check_continuation(spec: JobSpec, start: int, allow_changes: bool = False) -> None:
    """Refuse to continue a stored run under a spec it was not trained with, unless every change
    is one continuing can honour (or allow_changes)."""
    from rayganx.job.continuation import continuation_problems
    from rayganx.store.runs import stored_spec

    stored = stored_spec(Store(spec.run_url, spec.storage.endpoint_url))
    if start > 0 and stored is not None and not allow_changes:
        problems = continuation_problems(stored, spec)
        if problems:
            raise RunError("\n".join([f"{spec.run_url} was trained up to step {start} under another spec; continuing "
                                      f"it would mix two jobs in one run. Changed:", *(f"  {p}" for p in problems),
                                      "pass --allow-changes to continue it anyway, or give the job a new name"]))


def begin_attempt(spec: JobSpec, start: int) -> None:
    """Keep this attempt's spec in the run (specs/, and spec.yaml): once its data is ready, just
    before it trains, so a job that fails before training leaves the run as it was."""
    from rayganx.store.runs import record_attempt

    record_attempt(Store(spec.run_url, spec.storage.endpoint_url), spec.to_yaml(), start)


def _run_locked(spec: JobSpec, p: Plan, token: str, stop_on_lost, verbose: bool, printer, on_start,
                allow_changes: bool) -> tuple[int, list | None]:
    """The run itself, under its lock: returns where it started and the files it skipped."""
    start = last_step(spec)
    check_continuation(spec, start, allow_changes)
    embedded = not ray_is_up()
    init_ray(verbose=verbose)
    if embedded:
        check_fits_locally(spec)
    if spec.eval.every:
        prepare_eval(spec, p)
    monitor = run_monitor()
    try:
        trainer = trainer_for(spec, p, callbacks=[stop_on_lost], monitor=monitor, lock_token=token)
        begin_attempt(spec, start)
        if on_start:
            on_start(start, p.total_steps)
        with Progress(monitor, start, printer or (lambda m: None)):
            fit_interruptibly(trainer)
        return start, monitor_skipped(monitor)
    except KeyboardInterrupt:
        if embedded:  # stop the workers before the lock goes: nothing may write after it
            shutdown_embedded_ray()
            monitor = None
        raise
    except Exception as e:
        raise RunError(failure_line(e, spec.storage.path, embedded)) from e
    finally:
        if monitor is not None:
            import ray

            with contextlib.suppress(Exception):  # already gone with its node
                ray.kill(monitor)


def run(spec: JobSpec, *, verbose: bool = False, printer: Callable[[dict], None] | None = None,
        on_start: Callable[[int, int], None] | None = None, force: bool = False,
        notify: Callable[[str], None] | None = None, allow_changes: bool = False) -> RunResult:
    """Run a job to completion on the current (or an embedded) Ray cluster.

    The run folder is locked for the whole run (force: take over a live lock); notify hears the
    messages a user should see (a lock taken over). A stored run is continued only under the spec
    it was trained with, but for changes it can honour (allow_changes: any)."""
    from rayganx.store.runs import list_checkpoints, read_metrics

    spec = resolve_paths(spec)
    p = plan(spec)
    run_store = Store(spec.run_url, spec.storage.endpoint_url)
    with locked(spec, force, notify) as (lock, stop_on_lost):
        start, skipped = _run_locked(spec, p, lock.token, stop_on_lost, verbose, printer, on_start, allow_changes)
    ckpts = list_checkpoints(run_store)
    samples = sorted(f["name"] for f in run_store.listdir("samples"))
    history = read_metrics(run_store)
    steps = [m for m in history if "event" not in m]
    rollbacks = [m for m in history if m.get("event") == "rollback"]
    return RunResult(run_url=spec.run_url, steps=steps[-1]["step"] if steps else start,
                     metrics=steps[-1] if steps else {}, checkpoints=ckpts, samples=samples,
                     skipped_images=skipped, rollbacks=rollbacks)
