"""Adversarial losses and the regularisers that make GANs train.

All discriminator outputs are raw logits. The non-saturating loss is softplus on logits
(equivalently BCE-with-logits), never a sum of raw logits.
"""

from __future__ import annotations

import math

import torch
import torch.optim.swa_utils
import torch.nn.functional as F

from rayganx.models.randomness import GlobalDraws


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Discriminator loss; `smoothing` is one-sided label smoothing (real target 1 - s)."""
    if kind == "non_saturating":
        # BCE(real, 1 - s) = (1 - s)·softplus(-x) + s·softplus(x)
        real_term = (1 - smoothing) * F.softplus(-real) + smoothing * F.softplus(real)
        return real_term.mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wasserstein":
        return fake.mean() - real.mean()
    if kind == "least_squares":
        return 0.5 * ((real - (1 - smoothing)) ** 2).mean() + 0.5 * (fake ** 2).mean()
    raise ValueError(f"unknown loss {kind!r}")


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    if kind in ("hinge", "wasserstein"):
        return -fake.mean()
    if kind == "least_squares":
        return 0.5 * ((fake - 1) ** 2).mean()
    raise ValueError(f"unknown loss {kind!r}")


def gradient_penalty(d, real: torch.Tensor, fake: torch.Tensor, y=None,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP: E[(||∇D(x̂)||₂ - 1)²] at random interpolates x̂ of real and fake (alpha: one
    weight of real per row, uniform in [0, 1) unless given)."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], device=real.device)
    alpha = alpha.view(-1, *([1] * (real.dim() - 1))).to(real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x_hat, y).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor, pack: int = 1) -> torch.Tensor:
    """R1: E[||∇ₓD(x)||²] on reals (`real` must require grad); callers scale by γ/2.

    With packing, D's input x is `pack` consecutive samples of `real` side by side: the norm is
    taken over each pack (a reshape of the per-sample gradients), the mean over packs."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).reshape(real.shape[0] // pack, -1).sum(1).mean()


def ema_beta(decay: float, step: int, rampup: float | None = None) -> float:
    """The EMA's decay at generator step `step`, with StyleGAN2-ADA's ramp-up.

    ADA sets the half-life in images to min(ema_nimg, cur_nimg · rampup) and the decay to
    0.5 ** (batch / half-life); counted in generator steps, where batch cancels, the half-life
    is min(h, step · rampup) with h = ln 0.5 / ln decay. Early on the average so follows the
    generator closely instead of holding on to near-initial weights for thousands of steps."""
    if rampup is None:
        return decay
    half_life = math.log(0.5) / math.log(decay)
    half_life = min(half_life, step * rampup)
    return 0.5 ** (1.0 / half_life) if half_life > 0 else 0.0


class EMA(torch.optim.swa_utils.AveragedModel):
    """Exponential moving average of a generator: θ' ← β·θ' + (1-β)·θ, with β from `ema_beta`
    (a plain copy before `start`), on PyTorch's AveragedModel.

    β changes every step (the ramp-up), so the averaging function reads it from the instance
    instead of being built once with a fixed decay. Buffers (BatchNorm's running statistics) are
    copied, not averaged, as in StyleGAN2-ADA: an average of running statistics over weights
    that moved is no statistic of the averaged network. The copy made here counts as the first
    average, so the first update already blends (AveragedModel would copy again)."""

    def __init__(self, model: torch.nn.Module, decay: float, start: int = 0, rampup: float | None = None):
        super().__init__(model, multi_avg_fn=self._blend, use_buffers=False)
        self.module.eval().requires_grad_(False)
        self.n_averaged.fill_(1)
        self.decay, self.start, self.rampup, self._beta = decay, start, rampup, decay

    @property
    def model(self) -> torch.nn.Module:
        """The averaged generator itself (what checkpoints keep as g_ema)."""
        return self.module

    def _blend(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self._beta)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        self._beta = ema_beta(self.decay, step, self.rampup) if step >= self.start else 0.0
        self.update_parameters(model)


def _draws(draws, x: torch.Tensor):
    return draws if draws is not None else GlobalDraws(x.device)


def instance_noise(x: torch.Tensor, std: float, step: int, total: int, draws=None) -> torch.Tensor:
    """Gaussian noise on D's inputs, annealed linearly to zero over the run (Sønderby et al.).
    draws: where the noise comes from (`rayganx.models.randomness.Draws`; torch's global stream without)."""
    if std <= 0:
        return x
    scale = std * max(0.0, 1.0 - step / max(total, 1))
    return x + scale * _draws(draws, x).randn(x.shape[0], *x.shape[1:]).to(x.dtype) if scale > 0 else x


# --------------------------------------------------------------------------- DiffAugment
# Zhao et al. 2020: differentiable augmentations applied to reals and fakes alike, inside D's
# forward for both D and G steps, with fresh random parameters for every image.


def _brightness(x, draws):
    return x + (draws.rand(x.size(0), 1, 1, 1) - 0.5)


def _saturation(x, draws):
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (draws.rand(x.size(0), 1, 1, 1) * 2) + mean


def _contrast(x, draws):
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (draws.rand(x.size(0), 1, 1, 1) + 0.5) + mean


def translation(x, draws=None, ratio: float = 0.125):
    """Shift each image by up to ratio·size pixels, filling with zeros."""
    draws = _draws(draws, x)
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = draws.randint(-sh, sh + 1, n, 1, 1)
    ty = draws.randint(-sw, sw + 1, n, 1, 1)
    gb, gx, gy = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return padded.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def cutout(x, draws=None, ratio: float = 0.5):
    """Zero a square of ratio·size at a random place in each image."""
    draws = _draws(draws, x)
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = draws.randint(0, h + (1 - ch % 2), n, 1, 1)
    oy = draws.randint(0, w + (1 - cw % 2), n, 1, 1)
    gb, gx, gy = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


AUGMENTS = {"color": (_brightness, _saturation, _contrast), "translation": (translation,),
            "cutout": (cutout,)}


def diffaugment(x: torch.Tensor, policy: list[str], draws=None) -> torch.Tensor:
    """draws: where the random parameters come from (`rayganx.models.randomness.Draws`; torch's global
    stream without)."""
    draws = _draws(draws, x)
    for name in policy:
        for fn in AUGMENTS[name]:
            x = fn(x, draws)
    return x
