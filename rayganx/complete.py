"""Image completion: fill a hole in each image from a trained generator.

A GAN completes by semantic inpainting (Yeh et al. 2017): find the latent (and, for a conditional
model, the class) whose generated image best matches the known pixels (L1), with a prior that
keeps it realistic (the discriminator's non-saturating generator loss when the checkpoint has D,
else the latent's Gaussian log-density), then blend the generated pixels into the hole. A VAE
encodes the image with its hole filled and decodes. Two baselines share the command: `mean` fills
the hole with the image's mean known value, `nearest` with the training image closest on the
known pixels.

`complete_batch` is the whole computation for a batch of tensors (no Ray); `run` maps it over a
folder or Parquet input with Ray Data actors that load the model once each.
"""

from __future__ import annotations

import json
import posixpath
import re
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rayganx.spec import SpecError
from rayganx.storage import Store

METHODS = ("model", "mean", "nearest")
BLENDS = ("poisson", "feather", "none")
MANIFEST = "complete.json"
GRID = "grid.png"
RANDOM_HOLE = 0.8  # Yeh et al.'s random mask: 80% of the pixels missing
PREVIEW = 16  # images in grid.png


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

    from rayganx import models
    from rayganx.runs import load_state

    if checkpoint.endswith(".pt") and os.path.isfile(checkpoint):
        g, spec, num_classes = models.load_generator(checkpoint)
        return Model(g.requires_grad_(False), spec, num_classes)
    state = load_state(checkpoint, endpoint_url)
    g, spec, num_classes = models.generator_from_state(state)
    d = None
    # A packed D (PacGAN) judges several images at once: no score for one image alone.
    if spec.model.kind != "vae" and "d" in state["models"] and spec.model.pack == 1:
        d = models.build(spec, num_classes)["d"]
        d.load_state_dict(state["models"]["d"])
        d.eval().requires_grad_(False)
    g.requires_grad_(False)
    return Model(g, spec, num_classes, d)


@dataclass(frozen=True)
class Search:
    """The latent search's settings."""

    steps: int = 100
    restarts: int = 2
    prior: float = 0.01  # weight of the realism prior against the mean L1 on known pixels
    lr: float = 0.05


def _objective(model: Model, z, y, x, known, prior: float):
    from rayganx.models import generate

    out = generate(model.g, z, y)
    context = ((out - x).abs() * known).flatten(1).sum(1) / (known.flatten(1).sum(1) * x.shape[1]).clamp(min=1)
    if model.d is not None:
        realism = F.softplus(-model.d(out, y))  # the non-saturating generator loss
    else:
        realism = 0.5 * z.pow(2).mean(1)  # -log N(z; 0, I) per dimension, up to a constant
    return context + prior * realism, out


def _adam(model: Model, z, y, x, known, search: Search, steps: int):
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=search.lr)
    for _ in range(steps):
        loss, _ = _objective(model, z, y, x, known, search.prior)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # the candidates are independent: each gets its own gradient
        opt.step()
    with torch.no_grad():
        loss, out = _objective(model, z, y, x, known, search.prior)
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
    from rayganx.models import generate

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


# --------------------------------------------------------------------------- over a dataset


@dataclass
class Job:
    """One `rayganx complete`: what to read, how to fill, where to write."""

    checkpoint: str
    input_url: str
    mask: Mask
    out_url: str
    method: str = "model"
    search: Search = field(default_factory=Search)
    blend: str = "poisson"
    seed: int = 0
    batch_size: int = 64
    endpoint_url: str | None = None
    # planned: the images (keys and where they are), in chunks of batch_size
    size: int = 0
    channels: int = 1
    parquet: bool = False
    items: list = field(default_factory=list)  # [(key, path, row)]: row None for image files
    masks: dict = field(default_factory=dict)  # key -> mask path (a mask folder)

    def settings(self) -> dict:
        return {"format": "rayganx-complete/1", "checkpoint": self.checkpoint, "input": self.input_url,
                "mask": self.mask.url or (f"box:{','.join(map(str, self.mask.box))}" if self.mask.box else
                                          self.mask.kind + (f":{self.mask.fraction:g}" if self.mask.kind == "random"
                                                            else "")),
                "method": self.method, "blend": self.blend, "seed": self.seed,
                "search": asdict(self.search) if self.method == "model" else None}

    @property
    def chunks(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def chunk(self, i: int) -> list:
        return self.items[i * self.batch_size:(i + 1) * self.batch_size]


def _images_under(store: Store) -> list[str]:
    from rayganx.data import IMAGE_EXTENSIONS

    store.fs.invalidate_cache(store.root)  # listed afresh: the folder may have changed in this process
    return sorted(f for f in store.fs.find(store.root) if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)


def _list_input(job: Job) -> None:
    store = Store(job.input_url, job.endpoint_url)
    if not store.exists():
        raise SpecError(f"--input {job.input_url}: does not exist")
    files = [store.root] if store.fs.isfile(store.root) else sorted(store.fs.find(store.root))
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet:
        import pyarrow.parquet as pq

        job.parquet = True
        for f in parquet:
            with store.fs.open(f, "rb") as fh:
                rows = pq.ParquetFile(fh).metadata.num_rows
            stem = posixpath.splitext(posixpath.relpath(f, posixpath.dirname(store.root) if f == store.root
                                                        else store.root))[0]
            job.items += [(f"{stem}-{r:06d}", f, r) for r in range(rows)]
    else:
        images = _images_under(store)
        job.items = [(posixpath.splitext(posixpath.relpath(f, store.root))[0], f, None) for f in images]
    if not job.items:
        raise SpecError(f"--input {job.input_url}: no images (png, jpg, ...) or Parquet rows there")


def _match_masks(job: Job) -> None:
    """A mask folder holds one mask per input image, same relative name; every one is read and
    checked now, so a bad one stops the run before anything is written."""
    store = Store(job.mask.url, job.endpoint_url)
    found = {posixpath.splitext(posixpath.relpath(f, store.root))[0]: f for f in _images_under(store)}
    if len(found) != len(job.items):
        raise SpecError(f"--mask {job.mask.url}: {len(found)} mask images for {len(job.items)} input images")
    for key, _, _ in job.items:
        if key not in found:
            raise SpecError(f"--mask {job.mask.url}: no mask for {key} (masks pair with images by name)")
        with store.fs.open(found[key], "rb") as fh:
            read_hole(fh.read(), job.size, found[key])
    job.masks = found


def prepare(job: Job) -> Job:
    """Check everything that can be checked before Ray starts or anything is written."""
    if job.method not in METHODS:
        raise SpecError(f"--method {job.method!r}: expected one of {', '.join(METHODS)}")
    if job.blend not in BLENDS:
        raise SpecError(f"--blend {job.blend!r}: expected one of {', '.join(BLENDS)}")
    if job.search.steps < 1 or job.search.restarts < 1 or job.batch_size < 1:
        raise SpecError("--steps, --restarts and --batch-size must be at least 1")
    model = load_model(job.checkpoint, job.endpoint_url)
    spec = model.spec
    if spec.data.source == "gaussian_mixture":
        raise SpecError(f"{job.checkpoint}: a 2-D point model has no images to complete")
    job.size, job.channels = spec.data.image_size, spec.data.channels
    if job.mask.kind == "box":  # parsed against the size given then; check against the model's
        parse_mask(f"box:{','.join(map(str, job.mask.box))}", job.size)
    _list_input(job)
    if job.mask.kind == "dir":
        _match_masks(job)
    out = Store(job.out_url, job.endpoint_url)
    if out.exists(MANIFEST):
        there = json.loads(out.read_text(MANIFEST)).get("settings", {})
        if there != job.settings():
            diff = ", ".join(f"{k} {there.get(k)!r} there, {v!r} now" for k, v in job.settings().items()
                             if there.get(k) != v)
            raise SpecError(f"{out.url} holds another completion ({diff}); choose another --out")
    return job


def reference_images(job: Job) -> np.ndarray:
    """The checkpoint's training images (its data source, the validation fraction held out), as
    uint8 NCHW: what `nearest` searches. Needs Ray (the data pipeline)."""
    from rayganx import data as rdata

    spec = load_model(job.checkpoint, job.endpoint_url).spec
    if spec.data.source == "digits" or spec.data.path:
        batches = list(rdata.build(spec.data, "train", seed=None).iter_batches(batch_format="numpy", batch_size=4096))
        images = [b["image"] for b in batches if len(b["image"])]
        if images:
            return np.concatenate(images)
    raise SpecError(f"--method nearest: the training data of {job.checkpoint} ({spec.data.source}"
                    f"{' at ' + spec.data.path if spec.data.path else ''}) has no images to search")


def _load_images(job: Job, items: list, store: Store) -> torch.Tensor:
    """uint8 (N, C, size, size), brought to the model's size the way training data is."""
    import io

    from PIL import Image

    from rayganx.data import to_array

    tables: dict = {}
    out = []
    for key, path, row in items:
        if row is None:
            with store.fs.open(path, "rb") as fh:
                data = fh.read()
        else:
            if path not in tables:
                import pyarrow.parquet as pq

                with store.fs.open(path, "rb") as fh:
                    tables[path] = pq.read_table(fh, columns=["image"]).column(0)
            data = tables[path][row].as_py()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            out.append(to_array(img, job.size, job.channels, None))
    return torch.from_numpy(np.stack(out))


def complete_chunk(job: Job, i: int, model: Model | None, reference: torch.Tensor | None) -> dict:
    """Complete and write chunk i; returns its count, hole error (against the input's own pixels,
    when the mask was made here) and, for chunk 0, the preview grid's rows."""
    from rayganx.data import model_input, png_bytes, to_uint8

    items = job.chunk(i)
    src, out = Store(job.input_url, job.endpoint_url), Store(job.out_url, job.endpoint_url)
    original = _load_images(job, items, src)
    if job.mask.kind == "dir":
        mstore = Store(job.mask.url, job.endpoint_url)
        holes = []
        for key, _, _ in items:
            with mstore.fs.open(job.masks[key], "rb") as fh:
                holes.append(read_hole(fh.read(), job.size, job.masks[key]))
    else:
        holes = [synthetic_hole(job.mask, job.size, job.seed, key) for key, _, _ in items]
    hole = torch.from_numpy(np.stack(holes))
    x = model_input(original)
    seeds = [image_seed(job.seed, key) for key, _, _ in items]
    done, labels = complete_batch(x, hole, job.method, model=model, reference=reference, seeds=seeds,
                                  search=job.search, how=job.blend)
    u8 = to_uint8(done)
    for (key, _, _), im in zip(items, u8):
        out.write_bytes(png_bytes(im), key + ".png")
    h = hole.expand_as(original).numpy().astype(bool)
    sq = float(((u8.astype(np.float64) - original.numpy()) ** 2)[h].sum())
    preview = b""
    if i == 0:
        from rayganx.data import grid_png

        k = min(PREVIEW, len(items))
        shown = x[:k] * (1 - hole[:k])  # the hole shows mid grey
        cols = [shown, done[:k]] + ([x[:k]] if job.mask.kind != "dir" else [])
        preview = grid_png(torch.stack(cols, 1).flatten(0, 1), len(cols))
    return {"n": len(items), "sq_err": sq, "hole_px": int(h.sum()), "preview": preview}


class _Completer:
    """A Ray Data actor: loads the model (or the reference images) once, then completes chunks."""

    def __init__(self, job: Job, reference, threads: int):
        torch.set_num_threads(threads)
        self.job = job
        self.model = load_model(job.checkpoint, job.endpoint_url) if job.method == "model" else None
        self.reference = None if reference is None else torch.from_numpy(reference).float().div(127.5).sub(1)

    def __call__(self, batch: dict) -> dict:
        rows = [complete_chunk(self.job, int(c), self.model, self.reference) for c in batch["chunk"]]
        return {"chunk": batch["chunk"], "n": np.asarray([r["n"] for r in rows]),
                "sq_err": np.asarray([r["sq_err"] for r in rows]), "hole_px": np.asarray([r["hole_px"] for r in rows]),
                "preview": np.asarray([r["preview"] for r in rows], dtype=object)}


def run(job: Job, workers: int = 2, threads: int = 1, use_gpu: bool = False,
        on_chunk: Callable[[int, int], None] | None = None) -> dict:
    """Complete every image of a prepared job with `workers` Ray Data actors; returns the summary
    (also written to complete.json beside the images)."""
    import math

    import ray

    out = Store(job.out_url, job.endpoint_url)
    reference = reference_images(job) if job.method == "nearest" else None
    out.write_text(json.dumps({"settings": job.settings()}, indent=2), MANIFEST)
    ds = ray.data.from_items([{"chunk": i} for i in range(job.chunks)], override_num_blocks=job.chunks)
    done = ds.map_batches(_Completer, fn_constructor_args=(job, reference, threads), batch_size=1,
                          compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, job.chunks))),
                          num_cpus=threads, num_gpus=1 if use_gpu else 0)
    n, sq, px, preview = 0, 0.0, 0, b""
    for row in done.iter_rows():
        n, sq, px = n + int(row["n"]), sq + float(row["sq_err"]), px + int(row["hole_px"])
        preview = row["preview"] or preview
        if on_chunk:
            on_chunk(n, len(job.items))
    out.write_bytes(preview, GRID)
    summary = {"images": n, "out": out.url}
    if job.mask.kind != "dir" and px:  # the input was whole: its hole pixels are the truth
        mse = sq / px
        summary["hole_psnr_db"] = round(10 * math.log10(255 ** 2 / mse), 3) if mse else float("inf")
    out.write_text(json.dumps({"settings": job.settings(), "summary": summary}, indent=2), MANIFEST)
    return summary
