"""The training loop every Ray Train worker runs.

`train_loop` reads top to bottom: fetch a batch, let the task update on it, and at log steps
reduce the interval's stats across workers (rolling back when they diverged) and record them,
at checkpoint steps save and report. `Worker` holds what those steps need; the per-model
updates are in `rayganx.training.tasks`.
"""

from __future__ import annotations

import contextlib
import math
import resource
import threading
import time
from dataclasses import dataclass

import torch

from rayganx.data import sources as rdata
from rayganx.data import order
from rayganx.models import randomness
from rayganx.data import rows
from rayganx.store import tracking
from rayganx.training.checkpointing import report_checkpoint, restore, to_cpu
from rayganx.job.errors import UserError
from rayganx.data.order import Position
from rayganx.store.runs import MetricsLog
from rayganx.evaluation.scoring import Evaluator
from rayganx.job.spec import JobSpec
from rayganx.store.storage import Store
from rayganx.training.tasks import TASKS, ClassifierTask, Task, all_reduce
from rayganx.store.uploads import Uploader


class DivergenceError(UserError, RuntimeError):
    """Training produced a non-finite loss or an exploding gradient."""


def divergence(stats: torch.Tensor, grad_mask: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """1 when this step's stats show divergence, else 0, computed on the device: reading it
    back every step would make the host wait for the GPU at each step."""
    return ((~torch.isfinite(stats)).any() | (grad_mask & (stats > max_grad_norm)).any()).float()


def describe_divergence(mean: dict, step: int, max_grad_norm: float) -> str:
    bad = {k: v for k, v in mean.items() if not math.isfinite(v)}
    big = {k: v for k, v in mean.items() if k.startswith("grad_norm") and v > max_grad_norm}
    what = ", ".join(f"{k}={v:.4g}" for k, v in (bad or big).items()) or "a single step's values"
    kind = "non-finite values" if bad else f"gradient norm above train.max_grad_norm={max_grad_norm:g}"
    return f"training diverged by step {step}: {kind} ({what})"


def _faults(config: dict) -> dict:
    """Test hooks, from the driver's environment: RAYGANX_FAULT_LR_AT=step:lr sets every learning
    rate to lr once, at that step, to force a real divergence; RAYGANX_FAULT_TRACE_IDS=DIR makes
    every worker append the row ids of each batch it reads to a file there;
    RAYGANX_FAULT_SLOW_UPLOAD_S=s makes every checkpoint upload wait s seconds (a throttled store)."""
    env, out = config.get("faults", {}), {}
    if env.get("RAYGANX_FAULT_LR_AT"):
        at, lr = env["RAYGANX_FAULT_LR_AT"].split(":")
        out |= {"lr_at": int(at), "lr": float(lr)}
    if env.get("RAYGANX_FAULT_TRACE_IDS"):
        out["trace"] = env["RAYGANX_FAULT_TRACE_IDS"]
    if env.get("RAYGANX_FAULT_SLOW_UPLOAD_S"):
        out["slow_upload"] = float(env["RAYGANX_FAULT_SLOW_UPLOAD_S"])
    return out


def _node_ids(world: int) -> list[str]:
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    ids = [None] * world
    torch.distributed.all_gather_object(ids, node)
    return ids


class Interval:
    """The steps since the last logged one: the sum of their stats, whether any diverged (kept on
    the device: reading it back every step would make the host wait for the GPU each time), the
    images they took and their time."""

    def __init__(self, task: Task, device, step: int, mixing: bool = False):
        self.grad_mask = torch.tensor([n.startswith("grad_norm") for n in task.names], device=device)
        self.bad = torch.zeros((), device=device)
        # data.synthetic: generated rows seen, so each report says what share of the batches was
        # generated (the rows carry the mark from the data pipeline).
        self.mixing, self.generated = mixing, torch.zeros((), device=device)
        self.reset(step)

    def reset(self, step: int) -> None:
        self.sums, self.count, self.images, self.rows = None, 0, 0, 0
        self.bad.zero_()
        self.generated.zero_()
        self.start, self.t0 = step, time.perf_counter()

    def add(self, stats: torch.Tensor, images: int, max_grad_norm: float, batch: dict) -> None:
        self.sums = stats if self.sums is None else self.sums + stats
        self.bad = torch.maximum(self.bad, divergence(stats, self.grad_mask, max_grad_norm))
        self.count += 1
        self.images += images
        self.rows += len(batch["label"])
        if self.mixing:
            self.generated += batch["synthetic"].sum()

    def reduce(self, names: tuple[str, ...]) -> tuple[dict, bool]:
        """The interval's means over every worker and whether any rank diverged: one all-reduce."""
        share = [(self.generated / self.rows).reshape(1)] if self.mixing else []
        values = all_reduce(torch.cat([self.sums / self.count, *share, self.bad.reshape(1)])).tolist()
        mean = dict(zip(names, values))
        if self.mixing:
            mean["synthetic_share"] = values[len(names)]
        return mean, values[-1] > 0

    def timing(self, step: int) -> dict:
        elapsed = time.perf_counter() - self.t0
        return {"images_per_s": self.images / elapsed, "step_time": elapsed / (step - self.start)}


@dataclass
class Due:
    """What happens at a step besides the update."""

    log: bool
    checkpoint: bool
    sample: bool
    evaluate: bool

    def __bool__(self) -> bool:
        return self.log or self.checkpoint or self.sample or self.evaluate


class Worker:
    """One Ray Train worker's run: its task, where it logs, and what it does at log, sample,
    evaluation and checkpoint steps. config: spec (a JobSpec), num_classes, total_steps, rows (the
    training rows: `rayganx.data.rows.source`), real_features, init_from (a checkpoint URL to start
    from: a PBT donor), monitor (an actor that hears every logged row, for live progress) and
    faults (test hooks)."""

    def __init__(self, config: dict, rank: int, world: int, device):
        import ray.train

        self.spec: JobSpec = config["spec"]
        self.num_classes, self.total = config["num_classes"], config["total_steps"]
        self.rank, self.world, self.device = rank, world, device
        self.monitor, self.faults, self.init_from = config.get("monitor"), _faults(config), config.get("init_from")
        t = self.spec.train
        if t.deterministic:
            randomness.deterministic_kernels()
        # Identical initial weights on every rank; the run's other global draws (dropout) per rank.
        torch.manual_seed(t.seed)
        self.task = TASKS[self.spec.model.kind](self.spec, self.num_classes, device, world > 1)
        self.reader = rows.Reader(config["rows"], t.batch_size, t.seed, rank, world, device, counter=self.monitor,
                                  multiple=self.spec.model.pack)
        self.evaluator = Evaluator(self.spec, config, rank, world, device) if self.spec.eval.every else None
        self.val_shard = ray.train.get_dataset_shard("val") if isinstance(self.task, ClassifierTask) else None
        self.log = self.tb = self.uploader = None
        self.lock_token = config.get("lock_token")  # the driver's run lock (rayganx.store.lock): parts and commits carry it
        self.upload_done = threading.Event()  # at most one checkpoint upload in flight
        self.upload_done.set()
        self.telemetry = tracking.Telemetry(self.spec.name, rank)
        self.first_step_at = None

    def start(self) -> int:
        """Restore the state this attempt starts from; returns its step."""
        import ray.train

        spec, rank = self.spec, self.rank
        state, note, from_donor = restore(spec, ray.train.get_checkpoint(), self.init_from, self.device)
        step, self.lineage, self.generation = 0, None, 0
        self.position = Position()
        if state:
            self.task.load_state_dict(state)
            step, self.lineage = state["step"], state.get("lineage")
            self.position = Position.from_dict(state.get("position"))
            # Not the checkpoint Ray offered (a donor's, or an older complete one): the folders
            # written from here get names of their own, never one Ray already holds.
            self.generation = state.get("generation", 0) + (1 if from_donor or note else 0)
        rng = state.get("rng") if state else None
        if isinstance(rng, list) and len(rng) == self.world and rng[rank]:
            randomness.restore(rng[rank])  # each rank continues its own global streams
        else:  # a new run, or another worker count: the streams start afresh, a function of (seed, rank, step)
            randomness.seed_all(randomness.mix(spec.train.seed, rank, step))
        del state
        if rank == 0:
            self.uploader = Uploader(spec.storage.outage_tolerance_s)
            self.log = MetricsLog(Store(spec.run_url, spec.storage.endpoint_url), step, writer=self.lock_token or "",
                                  uploader=self.uploader)
            if from_donor:  # logged at once: a take-over at the last step trains no row after it
                self.log.append({"step": step, "event": "exploit", "restored_from": self.lineage,
                                 "note": note or f"took over {self.lineage}"}, force=True)
            elif note:
                self.log.append({"step": step, "event": "resume", "note": note}, force=True)
            self.tb = tracking.open_log(spec.run_url, spec.storage.endpoint_url, step, spec.to_yaml(), self.uploader)
        # The state rollbacks return to: where this attempt starts, then each checkpoint.
        self.good = {"state": to_cpu(self.task.state_dict()), "step": step, "rng": randomness.capture()}
        # Where each rank runs, in the first row after every (re)start: placement is visible in the run.
        self.placed = {"node_ids": _node_ids(self.world), "workers": self.world}
        return step

    def due(self, step: int) -> Due:
        s, last = self.spec, step >= self.total
        return Due(log=step % s.train.log_every == 0,
                   checkpoint=step % s.storage.checkpoint_every == 0 or last,
                   sample=(step % s.samples.every == 0 or last) and hasattr(self.task, "sample_png"),
                   evaluate=bool(s.eval.every) and (step % s.eval.every == 0 or last))

    def inject_faults(self, step: int) -> None:
        if self.faults.get("lr_at") == step:
            for o in self.task.optimizers().values():
                for group in o.param_groups:
                    group["lr"] = self.faults["lr"]
            del self.faults["lr_at"]  # once per process: after a rollback the run goes on at lowered rates

    def trace(self, pos: Position, batch: dict) -> None:
        if "trace" in self.faults:
            import json
            import os

            row = {"epoch": pos.epoch, "sample": pos.sample, "batches": pos.batches, "rank": self.rank,
                   "world": self.world, "ids": batch["id"].tolist(), "time": time.time()}
            with open(os.path.join(self.faults["trace"], f"ids_{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def roll_back(self, step: int, mean: dict) -> int:
        """Back to the last good state with lowered learning rates; returns its step. The batches
        that diverged are skipped: the data position moves on."""
        t, task = self.spec.train, self.task
        # Counted across restarts too (it is in the checkpoint): a retry after giving up starts
        # with the rollbacks already spent.
        rollbacks = task.rollbacks + 1
        why = describe_divergence(mean, step, t.max_grad_norm)
        if rollbacks > t.max_rollbacks:
            raise DivergenceError(f"{why}; gave up after train.max_rollbacks={t.max_rollbacks} "
                                  f"rollback(s); the last good checkpoint is kept")
        scale = task.lr_scale * t.rollback_lr_factor  # compounds over repeated rollbacks
        task.load_state_dict(to_cpu(self.good["state"]))
        task.set_lr_scale(scale)
        task.rollbacks = rollbacks
        randomness.restore(self.good["rng"])
        event = {"step": self.good["step"], "event": "rollback", "rollback": rollbacks, "diverged_at": step,
                 "lr_scale": task.lr_scale, "reason": why, "time": time.time()}
        if self.log:
            self.log.rollback(event)
        if self.tb:
            self.tb.restart(self.good["step"])
        if self.monitor and self.rank == 0:
            self.monitor.put.remote(event)
        return self.good["step"]

    def measure(self, step: int, mean: dict, timing: dict, due: Due) -> dict:
        """The logged row: the interval's means and timing, then validation and evaluation (whose
        time counts in neither interval)."""
        task = self.task
        metrics = mean | timing | {"step": step, "time": time.time(), "first_step_at": self.first_step_at,
                                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        metrics |= task.learning_rates() | self.placed | (
            {"rollbacks": task.rollbacks} if task.rollbacks else {})
        self.placed = {}
        with randomness.isolated():  # evaluation never moves the training streams
            if self.val_shard is not None and due.checkpoint:
                metrics |= task.validate(self.val_shard, self.spec.train.batch_size // self.world)
            if self.evaluator and due.evaluate:
                metrics |= self.evaluator(task)
        return metrics

    def publish(self, step: int, metrics: dict, due: Due) -> None:
        """Ray's metrics on every rank; from rank 0 live progress, samples, the metrics log and
        TensorBoard (forced out at checkpoints)."""
        self.telemetry.record(metrics)
        if self.rank != 0:
            return
        spec = self.spec
        if self.monitor:
            self.monitor.put.remote(metrics)  # fire and forget
        with randomness.isolated():
            png = self.task.sample_png(spec.samples.n, spec.samples.seed) if due.sample else None
        if png:
            self.uploader.put(Store(spec.run_url, spec.storage.endpoint_url), png, "samples", f"step_{step:06d}.png")
        self.log.append(metrics, force=due.checkpoint)
        if self.tb:
            self.tb.log(metrics, png, force=due.checkpoint)

    def checkpoint(self, step: int, metrics: dict) -> None:
        rng = [None] * self.world
        if self.world > 1:
            import torch.distributed as dist

            dist.all_gather_object(rng, randomness.capture())
        else:
            rng = [randomness.capture()]
        # One CPU copy serves as the rollback state and as what the checkpoint writes.
        state = to_cpu(self.task.state_dict()) | {"position": self.position.to_dict(), "generation": self.generation,
                                                   "world": self.world}
        self.good = {"state": state, "step": step, "rng": rng[self.rank]}
        # The previous upload first: a store slower than the checkpoints makes training wait, not
        # queue one more full copy of the state per checkpoint.
        self.upload_done.wait()
        self.upload_done.clear()
        report_checkpoint(self.spec, state, step, metrics, self.num_classes, rng, self.lineage, self.rank,
                          generation=self.generation, lock_token=self.lock_token, done=self.upload_done,
                          slow=self.faults.get("slow_upload", 0.0))
        self.telemetry.checkpointed()

    def check(self) -> None:
        """Raise on the training thread what ended a background write (a store outage)."""
        if self.uploader is not None:
            self.uploader.check()

    def flush(self, failed: bool) -> None:
        """Everything logged reaches the store before the worker ends (each write retried for up to the
        outage tolerance); after a failure, what can be written without waiting on the store again."""
        for pending in (self.log, self.tb):
            if pending:
                with contextlib.suppress(Exception):  # a store outage already has its own error
                    pending.flush()
        if self.uploader is None:
            return
        if failed:
            self.uploader.close()
            return
        try:
            self.uploader.drain()
        finally:
            self.uploader.close()


def train_loop(config: dict) -> None:
    """Runs on every worker: fetch a batch, update, and at log steps reduce and record, at
    checkpoint steps save and report."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    w = Worker(config, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    task, t = w.task, w.spec.train
    step = w.start()
    interval = Interval(task, w.device, step, mixing=w.spec.data.synthetic is not None)
    failed = True
    try:
        if step >= w.total:  # resumed at the end: nothing left to train
            failed = False
            return
        for pos, batch in w.reader.batches(w.position):
            w.first_step_at = w.first_step_at or time.time()  # the first batch enters training
            w.position = order.after(pos, t.batch_size)
            w.trace(pos, batch)
            x = rdata.model_input(batch["image"])
            if t.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            task.schedule(step, w.total)
            draws = randomness.Draws(t.seed, pos.batches, w.rank, w.world, w.device)
            stepped, stats = task.step(x, batch["label"], pos.batches, step, w.total, draws)
            w.check()
            interval.add(stats, x.shape[0] * w.world, t.max_grad_norm, batch)
            if not stepped:  # a discriminator-only update (train.d_steps > 1)
                continue
            step += 1
            w.inject_faults(step)
            due = w.due(step)
            if not due:
                continue
            mean, diverged = interval.reduce(task.names)
            if diverged:
                step = w.roll_back(step, mean)
                interval.reset(step)
                continue
            metrics = w.measure(step, mean, interval.timing(step), due)
            interval.reset(step)  # sampling, logging and checkpointing count in the next interval
            w.publish(step, metrics, due)
            if due.checkpoint:
                w.checkpoint(step, metrics)
            if step >= w.total:
                break
        failed = False
    finally:
        w.flush(failed)
