"""What each model family trains: its networks, optimisers and the update on one batch.

A task's `step` is one update on one batch and returns its stats (in `names` order) as one
tensor on the device; the loop in `rayganx.training.loop` reduces them across workers. GANs take a
discriminator update per batch and a generator update every `train.d_steps` batches.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from rayganx.data import sources as rdata
from rayganx.models import losses, networks, trained
from rayganx.data import points
from rayganx.models.randomness import GlobalDraws
from rayganx.job.spec import JobSpec
from rayganx.models.images import grid_png


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
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
        return {"models": {k: unwrap(m).state_dict() for k, m in self.networks().items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
                "lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.networks().items():
            unwrap(m).load_state_dict(state["models"][k])
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
        nets = networks.build(spec, num_classes)
        cl = spec.train.channels_last and spec.data.source != "gaussian_mixture"
        sync = spec.model.sync_batchnorm
        self.g = _prepare(nets["g"].to(device), distributed, cl, spec.train.compile, sync)
        self.d = _prepare(nets["d"].to(device), distributed, cl, spec.train.compile, sync)
        t = spec.train
        self.opt_g, self.opt_d = _adam(self.g.parameters(), t.optim_g), _adam(self.d.parameters(), t.optim_d)
        self.ema = losses.EMA(unwrap(self.g), t.ema_decay, t.ema_start, t.ema_rampup) if t.ema_decay else None
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
        return self.ema.model if self.ema else unwrap(self.g)

    def _d_input(self, x, step, total, draws):
        """What D sees of a batch: augmented and noised per sample, then packed (PacGAN)."""
        t = self.spec.train
        x = losses.diffaugment(x, t.diffaug, draws) if t.diffaug else x
        return networks.pack(losses.instance_noise(x, t.instance_noise, step, total, draws), self.spec.model.pack)

    def step(self, real, labels, it: int, step: int, total: int, draws=None) -> tuple[bool, torch.Tensor]:
        """One discriminator update on this batch; a generator update every d_steps batches.
        it: the batch's index in the run (lazy regularisers and d_steps count it); draws: the
        batch's random numbers (`rayganx.models.randomness.Draws`; torch's global stream without)."""
        t, n = self.spec.train, real.shape[0]
        draws = draws if draws is not None else GlobalDraws(self.device)
        y = labels if self.cond else None
        do_g = (it + 1) % t.d_steps == 0
        z = draws.randn(n, self.spec.model.latent_dim)
        with torch.set_grad_enabled(do_g), self.autocast:
            fake = self.g(z, y)  # reused by the generator update, as in the DCGAN reference

        r1_now = t.r1_gamma > 0 and it % t.r1_every == 0
        real_in = real.detach().requires_grad_(True) if r1_now else real
        with self.autocast:
            d_real, d_fake = self._d_input(real_in, step, total, draws), self._d_input(fake.detach(), step, total, draws)
            logit_real, logit_fake = self.d(d_real, y), self.d(d_fake, y)
            loss_d = losses.d_loss(t.loss, logit_real.float(), logit_fake.float(), t.label_smoothing)
            total_d = loss_d
            if t.gp_lambda > 0 and it % t.gp_every == 0:
                # Between the very (augmented, noised, packed) inputs D is trained on: the Lipschitz
                # constraint belongs where D is evaluated, not on images it never sees. R1 below
                # differentiates the logits D trains on (through the augmentation, as DiffAugment's R1).
                # Lazy like R1 (every k steps, x k): the double backward costs as much as the step.
                gp = losses.gradient_penalty(self.d, d_real, d_fake, y, draws.rand(d_real.shape[0]))
                total_d = total_d + t.gp_lambda * t.gp_every * gp
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
                    loss_g = losses.g_loss(t.loss, self.d(self._d_input(fake, step, total, draws), y).float())
                self.last_gnorm_g = self._backward(loss_g, self.g, self.opt_g)
                self.d.requires_grad_(True)
            self.opt_g.step()
            self.last_g = loss_g.detach()
            if self.ema:
                self.ema.update(unwrap(self.g), step)
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
            png = points.scatter_png(g(z).cpu().numpy(), points.mixture_centres(self.spec.data.mixture))
        else:
            png = grid_png(*trained.sample_images(g, self.spec, self.num_classes, n, seed, self.device))
        g.train(was_training)
        return png


class ClassifierTask(Task):
    names = ("loss", "accuracy", "grad_norm")

    def __init__(self, spec, num_classes, device, distributed):
        super().__init__(spec, num_classes, device, distributed)
        self.net = _prepare(networks.build(spec, num_classes)["net"].to(device), distributed,
                            spec.train.channels_last, spec.train.compile, spec.model.sync_batchnorm)
        self.opt = _adam(self.net.parameters(), spec.train.optim)

    def networks(self):
        return {"net": self.net}

    def optimizers(self):
        return {"net": self.opt}

    def step(self, x, labels, it, step, total, draws=None):
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
        net = unwrap(self.net).eval()
        correct = torch.zeros(2, device=self.device)
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=self.device):
            pred = net(rdata.model_input(batch["image"])).argmax(1)
            correct += torch.stack([(pred == batch["label"]).sum().float(),
                                    torch.tensor(float(len(pred)), device=self.device)])
        net.train()
        all_reduce(correct, mean=False)
        return {"val_accuracy": (correct[0] / correct[1].clamp(min=1)).item(), "val_images": int(correct[1].item())}


class VAETask(Task):
    names = ("loss", "recon", "kl", "elbo", "grad_norm")

    def __init__(self, spec, num_classes, device, distributed):
        super().__init__(spec, num_classes, device, distributed)
        self.net = _prepare(networks.build(spec)["net"].to(device), distributed, spec.train.channels_last,
                            spec.train.compile, spec.model.sync_batchnorm)
        self.opt = _adam(self.net.parameters(), spec.train.optim)

    def networks(self):
        return {"net": self.net}

    def optimizers(self):
        return {"net": self.opt}

    def generator(self):
        return unwrap(self.net)

    def step(self, x, labels, it, step, total, draws=None):
        draws = draws if draws is not None else GlobalDraws(self.device)
        eps = draws.randn(x.shape[0], self.spec.model.latent_dim)  # the reparameterisation's noise
        with self.autocast:
            logits, mu, logvar = self.net(x, eps)
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
        png = grid_png(*trained.sample_images(net, self.spec, None, n, seed, self.device))
        net.train()
        return png


TASKS = {"mlp_gan": GANTask, "dcgan": GANTask, "resnet_gan": GANTask, "cnn": ClassifierTask,
         "vae": VAETask}


def all_reduce(t: torch.Tensor, mean: bool = True) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        if mean:
            t /= dist.get_world_size()
    return t
