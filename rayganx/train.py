"""The training loop every Ray Train worker runs, and the per-model update steps.

`train_loop` reads top to bottom: build the task, restore, then iterate the dataset shard,
report every `log_every` steps and checkpoint every `checkpoint_every`. The tasks hold the
networks and their optimisers; their `step` is one update on one batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

from rayganx import data as rdata
from rayganx import losses, models, tracking
from rayganx.spec import JobSpec
from rayganx.storage import (MARKER, MetricsLog, Store, StorageError, checkpoint_manifest, list_checkpoints,
                              load_state)


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or an exploding gradient."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _prepare(model: torch.nn.Module, distributed: bool, channels_last: bool, compile: bool = False,
             sync_batchnorm: bool = False) -> torch.nn.Module:
    if distributed and sync_batchnorm:
        # Before the DDP wrap and before compiling: the BatchNorm layers are replaced. The
        # state_dict keys stay BatchNorm's, so checkpoints load into the plain networks.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()  # in place, unlike torch.compile(model): state_dict keys stay the same
    if not distributed:
        return model
    import ray.train.torch

    # Buffers are not re-broadcast on each forward: the discriminator runs on reals and fakes
    # (and interpolates) before one backward, and a broadcast in between breaks autograd.
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})


def lr_factor(decay: str, step: int, total: int) -> float:
    """The learning rates' share of their spec value at `step` of `total` (1 at step 0)."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    if decay == "linear":
        return 1.0 - frac
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0


def _adam(params, o) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def _no_sync(model):
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


class Task:
    """Networks, optimisers and the update step of one model family."""

    names: tuple[str, ...] = ()  # metric names, in the order `step` returns them

    def __init__(self, spec: JobSpec, num_classes: int | None, device: torch.device, distributed: bool):
        self.spec, self.device, self.num_classes = spec, device, num_classes
        self.lr_scale, self.rollbacks = 1.0, 0  # divergence rollbacks so far, kept in checkpoints
        self.lr_factor = 1.0  # train.lr_decay's factor at the current step
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if spec.train.precision == "bf16" and device.type == "cuda"
                         else contextlib.nullcontext())

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def optim_specs(self) -> dict:
        """The spec section behind each optimiser (same keys as `optimizers`)."""
        return {"net": self.spec.train.optim}

    def networks(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"models": {k: _unwrap(m).state_dict() for k, m in self.networks().items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
                "lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.networks().items():
            _unwrap(m).load_state_dict(state["models"][k])
        for k, o in self.optimizers().items():
            o.load_state_dict(state["optimizers"][k])
        self.set_lr_scale(state.get("lr_scale", 1.0))
        self.rollbacks = state.get("rollbacks", 0)

    def set_lr_scale(self, scale: float) -> None:
        """Learning rates = the spec's x scale (lowered by divergence rollbacks). The spec wins over
        the saved hyperparameters: a PBT exploit restores a donor's state under mutated ones."""
        self.lr_scale = scale
        specs = self.optim_specs()
        for k, o in self.optimizers().items():
            for group in o.param_groups:
                group.update(lr=specs[k].lr * scale * self.lr_factor, betas=tuple(specs[k].betas),
                             weight_decay=specs[k].weight_decay)

    def schedule(self, step: int, total: int) -> None:
        """Learning rates for the update that makes `step` + 1 (train.lr_decay)."""
        factor = lr_factor(self.spec.train.lr_decay, step, total)
        if factor != self.lr_factor:
            self.lr_factor = factor
            self.set_lr_scale(self.lr_scale)

    def learning_rates(self) -> dict[str, float]:
        return {f"lr_{k}": o.param_groups[0]["lr"] for k, o in self.optimizers().items()}

    def _backward(self, loss, model, opt) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.spec.train.grad_clip or math.inf
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip)


class GANTask(Task):
    names = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g")

    def __init__(self, spec, num_classes, device, distributed):
        super().__init__(spec, num_classes, device, distributed)
        nets = models.build(spec, num_classes)
        cl = spec.train.channels_last and spec.data.source != "gaussian_mixture"
        sync = spec.model.sync_batchnorm
        self.g = _prepare(nets["g"].to(device), distributed, cl, spec.train.compile, sync)
        self.d = _prepare(nets["d"].to(device), distributed, cl, spec.train.compile, sync)
        t = spec.train
        self.opt_g, self.opt_d = _adam(self.g.parameters(), t.optim_g), _adam(self.d.parameters(), t.optim_d)
        self.ema = losses.EMA(_unwrap(self.g), t.ema_decay, t.ema_start, t.ema_rampup) if t.ema_decay else None
        self.cond = spec.model.conditional
        self.last_g = torch.zeros((), device=device)
        self.last_gnorm_g = torch.zeros((), device=device)

    def networks(self):
        nets = {"g": self.g, "d": self.d}
        return nets | ({"g_ema": self.ema.model} if self.ema else {})

    def optimizers(self):
        return {"g": self.opt_g, "d": self.opt_d}

    def optim_specs(self):
        return {"g": self.spec.train.optim_g, "d": self.spec.train.optim_d}

    def generator(self) -> torch.nn.Module:
        """The generator samples and evaluation use: the EMA copy when there is one."""
        return self.ema.model if self.ema else _unwrap(self.g)

    def latents(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.spec.model.latent_dim, device=self.device)

    def interpolation_weights(self, n: int) -> torch.Tensor:
        """Per-row weights of the reals in the gradient penalty's interpolates."""
        return torch.rand(n, device=self.device)

    def _d_input(self, x, step, total):
        """What D sees of a batch: augmented and noised per sample, then packed (PacGAN)."""
        t = self.spec.train
        x = losses.diffaugment(x, t.diffaug) if t.diffaug else x
        return models.pack(losses.instance_noise(x, t.instance_noise, step, total), self.spec.model.pack)

    def step(self, real, labels, it: int, step: int, total: int) -> tuple[bool, torch.Tensor]:
        """One discriminator update on this batch; a generator update every d_steps batches."""
        t, n = self.spec.train, real.shape[0]
        y = labels if self.cond else None
        do_g = (it + 1) % t.d_steps == 0
        z = self.latents(n)
        with torch.set_grad_enabled(do_g), self.autocast:
            fake = self.g(z, y)  # reused by the generator update, as in the DCGAN reference

        r1_now = t.r1_gamma > 0 and it % t.r1_every == 0
        real_in = real.detach().requires_grad_(True) if r1_now else real
        with self.autocast:
            d_real, d_fake = self._d_input(real_in, step, total), self._d_input(fake.detach(), step, total)
            logit_real, logit_fake = self.d(d_real, y), self.d(d_fake, y)
            loss_d = losses.d_loss(t.loss, logit_real.float(), logit_fake.float(), t.label_smoothing)
            total_d = loss_d
            if t.gp_lambda > 0:
                # Between the very (augmented, noised, packed) inputs D is trained on: the Lipschitz
                # constraint belongs where D is evaluated, not on images it never sees. R1 below
                # differentiates the logits D trains on (through the augmentation, as DiffAugment's R1).
                gp = losses.gradient_penalty(self.d, d_real, d_fake, y, self.interpolation_weights(d_real.shape[0]))
                total_d = total_d + t.gp_lambda * gp
            if r1_now:  # lazy R1: every k steps, scaled by k (StyleGAN2)
                total_d = total_d + 0.5 * t.r1_gamma * t.r1_every * losses.r1_penalty(
                    logit_real, real_in, self.spec.model.pack)
        gnorm_d = self._backward(total_d, self.d, self.opt_d)
        self.opt_d.step()

        if do_g:
            # D's gradients are not needed here: freeze it and skip its all-reduce.
            with _no_sync(self.d):
                self.d.requires_grad_(False)
                with self.autocast:
                    loss_g = losses.g_loss(t.loss, self.d(self._d_input(fake, step, total), y).float())
                self.last_gnorm_g = self._backward(loss_g, self.g, self.opt_g)
                self.d.requires_grad_(True)
            self.opt_g.step()
            self.last_g = loss_g.detach()
            if self.ema:
                self.ema.update(_unwrap(self.g), step)
        prob = torch.sigmoid if t.loss == "non_saturating" else (lambda v: v)
        stats = torch.stack([loss_d.detach(), self.last_g, prob(logit_real.detach().float()).mean(),
                             prob(logit_fake.detach().float()).mean(), gnorm_d.detach(),
                             self.last_gnorm_g.detach()])
        return do_g, stats

    @torch.no_grad()
    def sample_png(self, n: int, seed: int) -> bytes:
        g = self.generator()
        was_training = g.training
        g.eval()
        gen = torch.Generator().manual_seed(seed)
        if self.spec.data.source == "gaussian_mixture":
            z = torch.randn(2000, self.spec.model.latent_dim, generator=gen).to(self.device)
            png = rdata.scatter_png(g(z).cpu().numpy(), rdata.mixture_centres(self.spec.data.mixture))
        else:
            png = rdata.grid_png(*models.sample_images(g, self.spec, self.num_classes, n, seed, self.device))
        g.train(was_training)
        return png


class ClassifierTask(Task):
    names = ("loss", "accuracy", "grad_norm")

    def __init__(self, spec, num_classes, device, distributed):
        super().__init__(spec, num_classes, device, distributed)
        self.net = _prepare(models.build(spec, num_classes)["net"].to(device), distributed,
                            spec.train.channels_last, spec.train.compile, spec.model.sync_batchnorm)
        self.opt = _adam(self.net.parameters(), spec.train.optim)

    def networks(self):
        return {"net": self.net}

    def optimizers(self):
        return {"net": self.opt}

    def step(self, x, labels, it, step, total):
        with self.autocast:
            logits = self.net(x)
            loss = F.cross_entropy(logits.float(), labels)
        gnorm = self._backward(loss, self.net, self.opt)
        self.opt.step()
        acc = (logits.argmax(1) == labels).float().mean()
        return True, torch.stack([loss.detach(), acc.detach(), gnorm.detach()])

    @torch.no_grad()
    def validate(self, shard, batch_size) -> dict[str, float]:
        """Accuracy over the validation set: each worker's shard, summed across workers."""
        net = _unwrap(self.net).eval()
        correct = torch.zeros(2, device=self.device)
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=self.device):
            pred = net(rdata.model_input(batch["image"])).argmax(1)
            correct += torch.stack([(pred == batch["label"]).sum().float(),
                                    torch.tensor(float(len(pred)), device=self.device)])
        net.train()
        _all_reduce(correct, mean=False)
        return {"val_accuracy": (correct[0] / correct[1].clamp(min=1)).item(), "val_images": int(correct[1].item())}


class VAETask(Task):
    names = ("loss", "recon", "kl", "elbo", "grad_norm")

    def __init__(self, spec, num_classes, device, distributed):
        super().__init__(spec, num_classes, device, distributed)
        self.net = _prepare(models.build(spec)["net"].to(device), distributed, spec.train.channels_last,
                            spec.train.compile, spec.model.sync_batchnorm)
        self.opt = _adam(self.net.parameters(), spec.train.optim)

    def networks(self):
        return {"net": self.net}

    def optimizers(self):
        return {"net": self.opt}

    def generator(self):
        return _unwrap(self.net)

    def step(self, x, labels, it, step, total):
        with self.autocast:
            logits, mu, logvar = self.net(x)
        # Bernoulli likelihood of pixel intensities in [0, 1]; per-image sums, batch means.
        recon = F.binary_cross_entropy_with_logits(logits.float(), (x + 1) / 2, reduction="sum") / x.shape[0]
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        loss = recon + kl
        gnorm = self._backward(loss, self.net, self.opt)
        self.opt.step()
        return True, torch.stack([loss.detach(), recon.detach(), kl.detach(), -loss.detach(), gnorm.detach()])

    @torch.no_grad()
    def sample_png(self, n, seed):
        net = self.generator().eval()
        png = rdata.grid_png(*models.sample_images(net, self.spec, None, n, seed, self.device))
        net.train()
        return png


TASKS = {"mlp_gan": GANTask, "dcgan": GANTask, "resnet_gan": GANTask, "cnn": ClassifierTask,
         "vae": VAETask}


def _all_reduce(t: torch.Tensor, mean: bool = True) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        if mean:
            t /= dist.get_world_size()
    return t


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


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str, task: Task, step: int, metrics: dict, num_classes: int | None,
                    rng: list, lineage: str | None) -> None:
    """state.pt (tensors and plain data only: it loads with weights_only=True), spec.yaml, meta.json."""
    state = task.state_dict() | {"step": step, "num_classes": num_classes, "spec": task.spec.to_dict(),
                                 "rng": rng, "lineage": lineage}
    torch.save(state, os.path.join(path, "state.pt"))
    with open(os.path.join(path, "spec.yaml"), "w") as f:
        f.write(task.spec.to_yaml())
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"step": step, "time": time.time(), "metrics": metrics}, f)


def upload_with_marker(checkpoint, dir_name: str):
    """Ray's own upload, then the completion marker, last: a folder without it was cut off."""
    import ray.train

    local = checkpoint.path
    manifest = checkpoint_manifest(local, int(dir_name.rsplit("_", 1)[-1]))
    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
    with persisted.filesystem.open_output_stream(f"{persisted.path}/{MARKER}") as f:
        f.write(json.dumps(manifest).encode())
    return persisted


def restore(spec: JobSpec, checkpoint, init_from: str | None, device) -> tuple[dict | None, str | None, bool]:
    """The state a worker starts from, a note when it is not the one Ray offered, and whether it
    is a PBT donor's.

    Ray offers the run's last reported checkpoint. It is used when complete (an incomplete one
    falls back to the newest complete checkpoint). `init_from` (a PBT donor) wins over Ray's unless
    that checkpoint was itself written after restoring from the same donor (a worker restart)."""
    state, note = None, None
    if checkpoint is not None:
        name = os.path.basename(checkpoint.path.rstrip("/"))
        try:
            state = load_state(f"{spec.run_url}/{name}", spec.storage.endpoint_url, map_location=device)
        except StorageError as e:
            if "incomplete" not in str(e):
                raise
            ckpts = list_checkpoints(Store(spec.run_url, spec.storage.endpoint_url), warn=False)
            note = f"{name} is incomplete; " + (f"resumed from {ckpts[-1]['name']}" if ckpts else "started afresh")
            state = load_state(ckpts[-1]["url"], spec.storage.endpoint_url, map_location=device) if ckpts else None
    if init_from and (state is None or state.get("lineage") != init_from):
        state = load_state(init_from, spec.storage.endpoint_url, map_location=device)
        state["lineage"] = init_from
        return state, None, True
    return state, note, False


def _faults(config: dict) -> dict:
    """Fault injection for the tests (RAYGANX_FAULT_LR_AT=step:lr in the driver's environment sets
    every learning rate to lr once, at that step, to force a real divergence)."""
    spec = config.get("faults", {}).get("RAYGANX_FAULT_LR_AT")
    if not spec:
        return {}
    at, lr = spec.split(":")
    return {"lr_at": int(at), "lr": float(lr)}


def _node_ids(world: int) -> list[str]:
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    ids = [None] * world
    torch.distributed.all_gather_object(ids, node)
    return ids


def epoch_batches(shard, spec: JobSpec, device="cpu"):
    """One epoch of a worker's shard, in full per-worker batches, as training consumes it."""
    # Each epoch of the shard is already a fresh permutation of the dataset (data.build): a
    # local shuffle buffer would add nothing but unseeded noise, memory and CPU time.
    return shard.iter_torch_batches(batch_size=spec.per_worker_batch, drop_last=True, device=device,
                                    prefetch_batches=2)


def train_loop(config: dict) -> None:
    """Runs on every worker. config: spec (a JobSpec), num_classes, total_steps, real_features,
    init_from (a checkpoint URL to start from: a PBT donor), monitor (an actor that hears every
    logged row, for live progress) and faults (test hooks)."""
    import ray.train
    import ray.train.torch

    spec: JobSpec = config["spec"]
    t = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    task = TASKS[spec.model.kind](spec, config["num_classes"], device, world > 1)
    total, monitor, faults = config["total_steps"], config.get("monitor"), _faults(config)

    state, note, from_donor = restore(spec, ray.train.get_checkpoint(), config.get("init_from"), device)
    step, lineage, restored = 0, None, {}
    if state:
        task.load_state_dict(state)
        step, lineage = state["step"], state.get("lineage")
        if from_donor:
            restored = {"restored_from": lineage, "restored_step": step}
    rng = state.get("rng") if state and not from_donor else None
    if isinstance(rng, list) and len(rng) == world:
        _set_rng_state(rng[rank])  # each rank continues its own noise stream
    else:
        torch.manual_seed(t.seed + 1000 * rank + step)
    del state

    log = MetricsLog(Store(spec.run_url, spec.storage.endpoint_url), step) if rank == 0 else None
    if log and note:
        log.append({"step": step, "event": "resume", "note": note}, force=True)
    tb = tracking.open_log(spec.run_url, spec.storage.endpoint_url, step, spec.to_yaml()) if rank == 0 else None
    telemetry = _Telemetry(spec.name, rank)
    evaluator = Evaluator(spec, config, rank, world, device) if spec.eval.every else None
    # The state rollbacks return to: where this attempt starts, then each checkpoint.
    good = {"state": _to_cpu(task.state_dict()), "step": step, "rng": _rng_state()}
    # Where each rank runs, in the first row after every (re)start: placement is visible in the run.
    placed = {"node_ids": _node_ids(world)}

    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if isinstance(task, ClassifierTask) else None
    sums, bad, count, images, it = None, torch.zeros((), device=device), 0, 0, 0
    # data.synthetic: generated rows seen since the last report, so each report says what share of
    # the batches was generated (the rows carry the mark from the data pipeline).
    mixing, generated = spec.data.synthetic is not None, torch.zeros((), device=device)
    grad_mask = torch.tensor([n.startswith("grad_norm") for n in task.names], device=device)
    t_last, first_step_at, last_report = time.perf_counter(), None, step
    try:
        while step < total:
            batches = 0
            for batch in epoch_batches(shard, spec, device):
                batches += 1
                x = rdata.model_input(batch["image"])
                if mixing:
                    generated += batch["synthetic"].sum()
                if t.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                first_step_at = first_step_at or time.time()  # the first batch enters training
                task.schedule(step, total)
                stepped, stats = task.step(x, batch["label"], it, step, total)
                it += 1
                images += x.shape[0] * world
                sums = stats if sums is None else sums + stats
                bad = torch.maximum(bad, divergence(stats, grad_mask, t.max_grad_norm))
                count += 1
                if not stepped:
                    continue
                step += 1
                if faults.get("lr_at") == step:
                    for o in task.optimizers().values():
                        for group in o.param_groups:
                            group["lr"] = faults["lr"]
                    faults.clear()  # once per process: after a rollback the run goes on at lowered rates

                last = step >= total
                do_ckpt = step % spec.storage.checkpoint_every == 0 or last
                do_sample = (step % spec.samples.every == 0 or last) and hasattr(task, "sample_png")
                do_eval = bool(spec.eval.every) and step % spec.eval.every == 0
                if not (step % t.log_every == 0 or do_ckpt or do_sample or do_eval):
                    continue
                # One all-reduce carries the interval's means and whether any rank diverged.
                share = [(generated / (count * spec.per_worker_batch)).reshape(1)] if mixing else []
                reduced = _all_reduce(torch.cat([sums / count, *share, bad.reshape(1)]))
                values = reduced.tolist()
                mean = dict(zip(task.names, values))
                if mixing:
                    mean["synthetic_share"] = values[len(task.names)]
                generated.zero_()
                if values[-1] > 0:
                    # Counted across restarts too (it is in the checkpoint): a retry after giving
                    # up starts with the rollbacks already spent.
                    rollbacks = task.rollbacks + 1
                    why = describe_divergence(mean, step, t.max_grad_norm)
                    if rollbacks > t.max_rollbacks:
                        raise DivergenceError(f"{why}; gave up after train.max_rollbacks={t.max_rollbacks} "
                                              f"rollback(s); the last good checkpoint is kept")
                    scale = task.lr_scale * t.rollback_lr_factor  # compounds over repeated rollbacks
                    task.load_state_dict(_to_cpu(good["state"]))
                    task.set_lr_scale(scale)
                    task.rollbacks = rollbacks
                    _set_rng_state(good["rng"])
                    event = {"step": good["step"], "event": "rollback", "rollback": rollbacks, "diverged_at": step,
                             "lr_scale": task.lr_scale, "reason": why, "time": time.time()}
                    step = good["step"]
                    sums, bad, count, images, last_report, t_last = None, bad.zero_(), 0, 0, step, time.perf_counter()
                    if log:
                        log.rollback(event)
                    if monitor and rank == 0:
                        monitor.put.remote(event)
                    continue  # the batches that diverged are skipped: the shard moves on
                elapsed = time.perf_counter() - t_last
                metrics = mean | {"step": step, "images_per_s": images / elapsed,
                                  "step_time": elapsed / (step - last_report), "time": time.time(),
                                  "first_step_at": first_step_at,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
                metrics |= task.learning_rates() | restored | placed | (
                    {"rollbacks": task.rollbacks} if task.rollbacks else {})
                restored, placed = {}, {}
                if val_shard is not None and do_ckpt:
                    metrics |= task.validate(val_shard, spec.per_worker_batch)
                if evaluator and (step % spec.eval.every == 0 or last):
                    metrics |= evaluator(task)
                # Reporting, sampling and checkpointing below count in the next interval's time.
                sums, count, images, last_report, t_last = None, 0, 0, step, time.perf_counter()
                telemetry.record(metrics)
                if rank == 0:
                    if monitor:
                        monitor.put.remote(metrics)  # live progress for the driver, fire and forget
                    png = task.sample_png(spec.samples.n, spec.samples.seed) if do_sample else None
                    if png:
                        Store(spec.run_url, spec.storage.endpoint_url).write_bytes(png, "samples", f"step_{step:06d}.png")
                    log.append(metrics, force=do_ckpt)
                    if tb:
                        tb.log(metrics, png, force=do_ckpt)
                if do_ckpt:
                    rng = [None] * world
                    if world > 1:
                        import torch.distributed as dist

                        dist.all_gather_object(rng, _rng_state())
                    else:
                        rng = [_rng_state()]
                    _checkpoint(task, step, metrics, config["num_classes"], rng, lineage, rank)
                    telemetry.checkpointed()
                    good = {"state": _to_cpu(task.state_dict()), "step": step, "rng": _rng_state()}
                if last:
                    break
            if batches == 0:
                raise rdata.DataError(f"data: a worker's shard yielded no full batch of "
                                      f"{spec.per_worker_batch}; the dataset is smaller than "
                                      f"train.batch_size={t.batch_size}")
    finally:
        for pending in (log, tb):
            if pending:
                with contextlib.suppress(Exception):  # a store outage already has its own error
                    pending.flush()


def _checkpoint(task: Task, step: int, metrics: dict, num_classes, rng: list, lineage, rank: int) -> None:
    """Every rank reports (a barrier); rank 0's folder is uploaded, its marker written last."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    # ray.train.report is a barrier whose queue the controller drains on its own poll interval:
    # reporting every log step stalled training by half. Logs go to the metrics log and Ray's
    # metrics; Ray Train hears from us at checkpoints.
    checkpoint = None
    if rank == 0:
        local = tempfile.mkdtemp(prefix="rayganx_ckpt_")  # removed by Ray once uploaded
        try:
            save_checkpoint(local, task, step, metrics, num_classes, rng, lineage)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        checkpoint = Checkpoint.from_directory(local)
    # Asynchronous: the upload (and its marker, written last) runs in a background thread while
    # training goes on; a failed upload fails the run at the next step.
    mode = CheckpointUploadMode.ASYNC if task.spec.storage.async_upload else CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:06d}",
                     checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=checkpoint is not None,
                     checkpoint_upload_fn=upload_with_marker if checkpoint is not None else None)


class Evaluator:
    """Sample-quality metrics during training: every worker generates and extracts its share."""

    def __init__(self, spec: JobSpec, config: dict, rank: int, world: int, device):
        from rayganx import metrics as m

        self.m, self.spec, self.rank, self.world, self.device = m, spec, rank, world, device
        self.num_classes = config["num_classes"]
        self.points = spec.data.source == "gaussian_mixture"
        if self.points:  # scored against the mixture's known modes: no extractor, no real features
            return
        self.extractor = m.load_extractor(spec.eval, spec.data.channels, spec.storage.endpoint_url).to(device)
        import ray

        # Put in Ray's object store once by the driver; only rank 0 fetches them.
        fetch = lambda ref: (ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref) if rank == 0 else None  # noqa: E731
        self.real, self.cas_data = fetch(config.get("real_features")), fetch(config.get("cas_data"))
        self.feature_metrics = [n for n in spec.eval.metrics if n != "cas"]

    def __call__(self, task) -> dict:
        import torch.distributed as dist

        g = task.generator()
        if self.points:
            if self.rank != 0:  # a few thousand points from a small MLP: rank 0 alone
                return {}
            was_training = g.training
            e = self.spec.eval
            scores = self.m.mode_metrics(g.eval(), self.spec, e.metrics, e.num_samples, e.sample_sets, device=self.device)
            g.train(was_training)
            return scores
        scores = {}
        if self.cas_data is not None and self.rank == 0:
            # Rank 0 alone trains the CAS classifiers (seconds on digits); the others wait at the gather.
            scores = self.m.classification_accuracy_score(g, self.spec, self.num_classes, self.cas_data,
                                                          device=self.device)
        if not self.feature_metrics:
            return scores
        was_training = g.training
        g.eval()
        part = self.m.generated_features(g, self.spec, self.num_classes, self.extractor, self.spec.eval.num_samples,
                                         seed=0, device=self.device, rank=self.rank, world=self.world)
        g.train(was_training)
        part = {i: (f.cpu(), None if lg is None else lg.cpu()) for i, (f, lg) in part.items()}
        parts = [part]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, part)
        if self.rank != 0:
            return {}
        fake, logits = self.m.assemble(parts)
        return scores | self.m.compute(self.feature_metrics, self.real, fake, logits)


class _Telemetry:
    """Training metrics as Ray custom metrics, scraped from each node's Prometheus endpoint."""

    EXPORTED = ("loss_d", "loss_g", "loss", "images_per_s", "step", "step_time", "val_accuracy", "elbo", "fid",
                "kid", "rollbacks", "last_checkpoint_time")

    def __init__(self, job: str, rank: int):
        from ray.util import metrics as rm

        self.tags = {"job": job, "rank": str(rank)}
        self.gauges = {k: rm.Gauge(f"rayganx_{k}", description=f"rayganx training metric {k}",
                                   tag_keys=("job", "rank")) for k in self.EXPORTED}

    def record(self, metrics: dict) -> None:
        # Rows name rollbacks only after the first one; 0 before keeps the series (and its panel) alive.
        metrics = {"rollbacks": 0} | metrics
        for k, gauge in self.gauges.items():
            if k in metrics and metrics[k] is not None:
                gauge.set(float(metrics[k]), tags=self.tags)

    def checkpointed(self) -> None:
        """The time of the last checkpoint: Grafana shows its age as time() - this."""
        self.gauges["last_checkpoint_time"].set(time.time(), tags=self.tags)
