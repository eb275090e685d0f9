"""Completing one batch of images (no Ray): the hole masks, and the fills.

A GAN completes by semantic inpainting (Yeh et al. 2017): find the latent (and, for a conditional
model, the class) whose generated image best matches the known pixels (L1, each known pixel
weighted by how much of its neighbourhood is missing, Yeh et al.'s weighted context loss),
optionally with a prior that keeps it realistic (the discriminator's non-saturating generator loss
when the checkpoint has D, else the latent's Gaussian log-density), then blend the generated pixels
into the hole. A VAE encodes the image with its hole filled and decodes. Two baselines: `mean` fills the hole with the
image's mean known value, `nearest` with the training image closest on the known pixels.
`complete_batch` is the whole computation for a batch of tensors; `rayganx.apps.complete` maps it over
a dataset.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rayganx.job.spec import SpecError
from rayganx.store.storage import Store

METHODS = ("model", "mean", "nearest")
BLENDS = ("poisson", "feather", "none")
RANDOM_HOLE = 0.8  # Yeh et al.'s random mask: 80% of the pixels missing
CONTEXTS = ("weighted", "uniform")
CONTEXT_WINDOW = 7  # Yeh et al.'s neighbourhood for the weighted context loss


# --------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class Mask:
    """Where the holes are. kind: center | random | box | dir. Holes are 1 in `hole` arrays."""

    kind: str
    box: tuple[int, int, int, int] | None = None  # x, y, w, h
    fraction: float = RANDOM_HOLE
    url: str | None = None  # a folder of mask images (white = hole), one per input image, same names


_BOX = re.compile(r"^box:(-?\d+),(-?\d+),(-?\d+),(-?\d+)$")
_RANDOM = re.compile(r"^random(?::([0-9.]+))?$")


def parse_mask(text: str, size: int, endpoint_url: str | None = None) -> Mask:
    """--mask for images of size x size pixels; refuses masks that leave nothing to fill or nothing
    to match."""
    text = text.strip()
    if text in ("center", "centre"):
        return Mask("center")
    if m := _RANDOM.match(text):
        frac = float(m.group(1)) if m.group(1) else RANDOM_HOLE
        if not 0 < frac < 1:
            raise SpecError(f"--mask {text}: the missing fraction must be between 0 and 1 (exclusive)")
        return Mask("random", fraction=frac)
    if m := _BOX.match(text):
        x, y, w, h = map(int, m.groups())
        if w < 1 or h < 1:
            raise SpecError(f"--mask {text}: the box has no area (w and h must be at least 1)")
        if x < 0 or y < 0 or x + w > size or y + h > size:
            raise SpecError(f"--mask {text}: the box reaches outside the {size}x{size} image "
                            f"(x + w and y + h must be at most {size})")
        if w == size and h == size:
            raise SpecError(f"--mask {text}: the box covers the whole image: no known pixels to match")
        return Mask("box", box=(x, y, w, h))
    if text.startswith(("box", "random")):
        raise SpecError(f"--mask {text}: expected box:x,y,w,h (pixels) or random[:fraction]")
    store = Store(text, endpoint_url)
    if not store.exists() or store.fs.isfile(store.root):
        raise SpecError(f"--mask {text}: not center, random, box:x,y,w,h or a folder of mask images")
    return Mask("dir", url=text)


def image_seed(seed: int, key: str) -> int:
    """Each image's own seed: results do not depend on which batch or worker it landed in."""
    return seed * 2 ** 32 + zlib.crc32(key.encode())


def synthetic_hole(mask: Mask, size: int, seed: int, key: str) -> np.ndarray:
    """The hole (1, size, size) float32, 1 = missing, of a center / random / box mask."""
    hole = np.zeros((1, size, size), np.float32)
    if mask.kind == "center":  # the central quarter of the area, as in Yeh et al.
        a, b = size // 4, size - size // 4
        hole[:, a:b, a:b] = 1
    elif mask.kind == "box":
        x, y, w, h = mask.box
        hole[:, y:y + h, x:x + w] = 1
    elif mask.kind == "random":
        gen = torch.Generator().manual_seed(image_seed(seed, key) + 1)
        hole[0] = (torch.rand(size, size, generator=gen) < mask.fraction).numpy()
        hole[0, size // 2, size // 2] = 1  # never no hole at all
        if hole.all():
            hole[0, 0, 0] = 0
    else:
        raise ValueError(mask.kind)
    return hole


def read_hole(data: bytes, size: int, where: str) -> np.ndarray:
    """A mask image (white = hole) as (1, size, size) float32; one clear error when it cannot be one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(__import__("io").BytesIO(data)) as img:
            img.load()
            arr = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError) as e:
        raise SpecError(f"--mask: {where} is not an image ({e})") from None
    if arr.shape != (size, size):
        raise SpecError(f"--mask: {where} is {arr.shape[1]}x{arr.shape[0]}, the images are {size}x{size}")
    hole = (arr > 127).astype(np.float32)[None]
    if not hole.any():
        raise SpecError(f"--mask: {where} has no hole (no pixel above 127)")
    if hole.all():
        raise SpecError(f"--mask: {where} is all hole: no known pixels to match")
    return hole


# --------------------------------------------------------------------------- the model


@dataclass
class Model:
    """A checkpoint's generator (or VAE), with its discriminator when the checkpoint has one."""

    g: torch.nn.Module
    spec: object
    num_classes: int | None
    d: torch.nn.Module | None = None

    @property
    def vae(self) -> bool:
        return self.spec.model.kind == "vae"

    @property
    def conditional(self) -> bool:
        return bool(self.spec.model.conditional and self.num_classes)


def load_model(checkpoint: str, endpoint_url: str | None = None) -> Model:
    """Weights only: an exported .pt (no discriminator) or a complete checkpoint folder."""
    import os

    from rayganx.models import networks, trained
    from rayganx.store.runs import load_state

    if checkpoint.endswith(".pt") and os.path.isfile(checkpoint):
        g, spec, num_classes = trained.load_generator(checkpoint)
        return Model(g.requires_grad_(False), spec, num_classes)
    state = load_state(checkpoint, endpoint_url)
    g, spec, num_classes = trained.generator_from_state(state)
    d = None
    # A packed D (PacGAN) judges several images at once: no score for one image alone.
    if spec.model.kind != "vae" and "d" in state["models"] and spec.model.pack == 1:
        d = networks.build(spec, num_classes)["d"]
        d.load_state_dict(state["models"]["d"])
        d.eval().requires_grad_(False)
    g.requires_grad_(False)
    return Model(g, spec, num_classes, d)


@dataclass(frozen=True)
class Search:
    """The latent search's settings."""

    steps: int = 200
    restarts: int = 2
    # The realism prior's weight against the normalised context loss. Yeh et al.'s 0.003 weighs a sum
    # over pixels: here about 0.003 / 50 for a centre hole at 32 px, close to this 0.
    prior: float = 0.0
    lr: float = 0.05
    context: str = "weighted"


def context_weights(known, how: str = "weighted"):
    """Each known pixel's weight in the context loss (0 on the hole). weighted: the share of missing
    pixels in its 7x7 window (Yeh et al. 2017), so the pixels that border the hole, the ones the
    completion must continue, count and a far-away background does not; uniform: 1."""
    if how == "uniform":
        return known
    share = F.avg_pool2d(1 - known, CONTEXT_WINDOW, stride=1, padding=CONTEXT_WINDOW // 2, count_include_pad=False)
    return known * share


def _objective(model: Model, z, y, x, w, search: Search):
    """Per candidate: the context loss (w: context_weights) plus the prior, and the generated images."""
    from rayganx.models.networks import generate

    out = generate(model.g, z, y)
    # Normalised by the weights' sum: the prior's weight means the same for every mask.
    context = ((out - x).abs() * w).flatten(1).sum(1) / (w.flatten(1).sum(1) * x.shape[1]).clamp(min=1e-6)
    if not search.prior:
        return context, out
    if model.d is not None:
        realism = F.softplus(-model.d(out, y))  # the non-saturating generator loss
    else:
        realism = 0.5 * z.pow(2).mean(1)  # -log N(z; 0, I) per dimension, up to a constant
    return context + search.prior * realism, out


def _adam(model: Model, z, y, x, known, search: Search, steps: int):
    z = z.clone().requires_grad_(True)
    w = context_weights(known, search.context)
    opt = torch.optim.Adam([z], lr=search.lr)
    for _ in range(steps):
        loss, _ = _objective(model, z, y, x, w, search)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # the candidates are independent: each gets its own gradient
        opt.step()
    with torch.no_grad():
        loss, out = _objective(model, z, y, x, w, search)
    return z.detach(), loss, out


def fill_gan(model: Model, x, known, seeds: list[int], search: Search):
    """The generated image of the best latent (and class) per image, and the class (or None).

    Every image starts `restarts` latents per class (its own seed). A quarter of the steps screens
    them all; the best `restarts` (at least 2) of each image then take the remaining steps."""
    n, dim = x.shape[0], model.spec.model.latent_dim
    classes = model.num_classes if model.conditional else 1
    k = classes * search.restarts
    z = torch.stack([torch.randn(k, dim, generator=torch.Generator().manual_seed(s)) for s in seeds])  # n, k, dim
    y = torch.arange(classes).repeat_interleave(search.restarts).expand(n, k) if model.conditional else None
    xs, ks = x.repeat_interleave(k, 0), known.repeat_interleave(k, 0)
    screen = max(1, search.steps // 4) if k > max(2, search.restarts) else 0
    if screen:
        zf, loss, _ = _adam(model, z.reshape(n * k, dim), None if y is None else y.reshape(-1), xs, ks, search, screen)
        k = min(k, max(2, search.restarts))  # two at least: a close second class gets its chance
        keep = loss.view(n, -1).topk(k, dim=1, largest=False).indices  # n, k
        z = zf.view(n, -1, dim).gather(1, keep[..., None].expand(-1, -1, dim))
        y = None if y is None else y.gather(1, keep)
        xs, ks = x.repeat_interleave(k, 0), known.repeat_interleave(k, 0)
    zf, loss, out = _adam(model, z.reshape(n * k, dim), None if y is None else y.reshape(-1), xs, ks, search,
                          search.steps - screen)
    best = loss.view(n, k).argmin(1)
    pick = torch.arange(n) * k + best
    return out[pick], (None if y is None else y[torch.arange(n), best])


@torch.no_grad()
def fill_vae(model: Model, x, known, rounds: int = 5):
    """Encode with the hole filled, decode; the decoded hole feeds the next round."""
    from rayganx.models.networks import generate

    cur = known * x + (1 - known) * fill_mean(x, known)
    for _ in range(rounds):
        mu, _ = model.g.encode(cur)
        rec = generate(model.g, mu)
        cur = known * x + (1 - known) * rec
    return rec


def fill_mean(x, known):
    """Each image's mean known value, per channel."""
    mean = (x * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp(min=1)
    return mean.expand_as(x)


def fill_nearest(x, known, reference):
    """The reference image closest to each image on its known pixels (L2), and its index.
    reference: (M, C, H, W) in [-1, 1]."""
    r = reference.flatten(1)  # M, P
    m = known.expand_as(x).flatten(1)  # N, P
    xm = (x.flatten(1) * m)
    # sum_p m (x - r)^2 = sum m x^2 - 2 (m x) . r + m . r^2
    dist = (xm * x.flatten(1)).sum(1, keepdim=True) - 2 * xm @ r.T + m @ (r * r).T
    idx = dist.argmin(1)
    return reference[idx], idx


def _smooth(t, sigma: float):
    radius = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=t.dtype) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = t.shape[1]
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(t, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@torch.no_grad()
def blend(fill, x, known, how: str = "poisson", iters: int = 400):
    """Known pixels exactly as they were; the hole from `fill`, corrected so no seam shows.

    The correction is the difference input - fill on the known pixels carried into the hole:
    poisson solves Laplace's equation for it there (Perez et al. 2003 with the fill's own
    gradients as the guidance field; Jacobi iterations from the feathered start), feather spreads
    it by a normalised Gaussian blur of the known pixels."""
    if how == "none":
        return (known * x + (1 - known) * fill).clamp(-1, 1)
    kn = known.expand_as(x)
    diff = (x - fill) * kn
    sigma = max(1.0, x.shape[-1] / 8)
    corr = _smooth(diff, sigma) / _smooth(kn, sigma).clamp(min=1e-6)
    if how == "poisson":
        c = x.shape[1]
        four = torch.tensor([[0, .25, 0], [.25, 0, .25], [0, .25, 0]], dtype=x.dtype).view(1, 1, 3, 3).expand(c, 1, 3, 3)
        for _ in range(iters):
            corr = kn * diff + (1 - kn) * F.conv2d(F.pad(corr, (1, 1, 1, 1), mode="replicate"), four, groups=c)
    return (kn * x + (1 - kn) * (fill + corr)).clamp(-1, 1)


def complete_batch(x, hole, method: str, *, model: Model | None = None, reference=None, seeds=None,
                   search: Search = Search(), how: str = "poisson"):
    """Completed images for a batch. x: (N, C, H, W) in [-1, 1]; hole: (N, 1, H, W), 1 = missing.
    Returns (images, labels): labels are the chosen classes of a conditional GAN (else None)."""
    known = 1 - hole
    labels = None
    if method == "mean":
        fill = fill_mean(x, known)
    elif method == "nearest":
        fill, _ = fill_nearest(x, known, reference)
    elif method == "model" and model.vae:
        fill = fill_vae(model, x, known)
    elif method == "model":
        fill, labels = fill_gan(model, x, known, seeds if seeds is not None else list(range(len(x))), search)
    else:
        raise SpecError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    return blend(fill, x, known, how), labels
