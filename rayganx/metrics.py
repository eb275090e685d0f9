"""Evaluation: feature extractors (offline) and a registry of sample-quality metrics.

Images go through an extractor once; metrics take features. FID, KID and IS come from
torchmetrics (fed precomputed features through an identity "network"); improved
precision/recall (Kynkäänniemi et al. 2019), which torchmetrics lacks, is written here.
Real-data features are computed once per dataset, extractor and image size and cached in storage.
"""

from __future__ import annotations

import hashlib
import io
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from rayganx.spec import EvalSpec, JobSpec, from_dict


class EvalError(ValueError):
    """An evaluation set-up problem (extractor missing or unreadable), in one line."""


# --------------------------------------------------------------------------- extractors


class Extractor(nn.Module):
    """images in [-1, 1] (N, C, H, W) -> features (N, D); `logits` when it has class outputs."""

    has_logits = False

    def logits(self, x):  # pragma: no cover - only classifier extractors have logits
        raise EvalError("this extractor has no class logits (Inception Score needs eval.features: classifier)")


class RandomCNN(Extractor):
    """A fixed, seeded, randomly initialised CNN (Naeem et al. 2020): comparable within one dataset only."""

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        layers, width = [], channels
        for out in (64, 128, 256):
            conv = nn.Conv2d(width, out, 4, 2, 1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (width * 16)) ** 0.5)
                conv.bias.zero_()
            layers += [conv, nn.LeakyReLU(0.2)]
            width = out
        self.body = nn.Sequential(*layers).eval().requires_grad_(False)

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


class ClassifierFeatures(Extractor):
    """The penultimate layer of a rayganx CNN checkpoint; its logits give the Inception Score."""

    has_logits = True

    def __init__(self, net: nn.Module, size: int, channels: int):
        super().__init__()
        self.net, self.size, self.channels = net.eval().requires_grad_(False), size, channels

    def _fit(self, x):
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, x):
        return self.net.features(self._fit(x))

    def logits(self, x):
        return self.net(self._fit(x))


class TorchScriptFeatures(Extractor):
    """A TorchScript detector called like StyleGAN2-ADA's Inception: uint8 NCHW, return_features=True."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if u8.shape[1] == 1:
            u8 = u8.repeat(1, 3, 1, 1)
        return self.module(u8, return_features=True).float()


def load_extractor(ev: EvalSpec, channels: int, endpoint_url: str | None = None) -> Extractor:
    """Build the job's extractor; a missing or unreadable file is a clear error."""
    if ev.features == "random":
        return RandomCNN(channels)
    from rayganx.storage import Store, StorageError

    url = ev.extractor
    try:
        store = Store(url, endpoint_url)
        if not store.exists():
            raise EvalError(f"eval.extractor: {url} does not exist")
        if ev.features == "torchscript":
            with store.fs.open(store.root, "rb") as f:
                return TorchScriptFeatures(torch.jit.load(io.BytesIO(f.read()), map_location="cpu"))
        from rayganx.models import build
        from rayganx.storage import load_state

        state = load_state(url, endpoint_url)
        spec = from_dict(state["spec"], url)
        if spec.model.kind != "cnn":
            raise EvalError(f"eval.extractor: {url} is a {spec.model.kind} checkpoint, not a cnn classifier")
        net = build(spec, state["num_classes"])["net"]
        net.load_state_dict(state["models"]["net"])
        return ClassifierFeatures(net, spec.data.image_size, spec.data.channels)
    except (EvalError, StorageError):
        raise
    except Exception as e:
        raise EvalError(f"eval.extractor: cannot load {url}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


# --------------------------------------------------------------------------- metrics


class _Precomputed(nn.Identity):
    """Lets torchmetrics' image metrics take features we already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


# Features are gathered before the metrics run on one rank: torchmetrics must not sync across
# the training process group itself (it would wait forever for the other ranks).
LOCAL = {"sync_on_compute": False}


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=False, **LOCAL)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return float(m.compute())


def kid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = min(len(real), len(fake), 1000)
    m = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subset_size=subset, subsets=50, **LOCAL)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    torch.manual_seed(0)  # KID averages random subsets: fixed, so equal inputs give equal scores
    return float(m.compute()[0])


def inception_score(fake_logits: torch.Tensor) -> float:
    from torchmetrics.image.inception import InceptionScore

    m = InceptionScore(feature=_Precomputed(fake_logits.shape[1]), splits=1, **LOCAL)
    m.update(fake_logits.double())
    return float(m.compute()[0])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall: the share of fakes inside the real k-NN manifold, and vice versa."""

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # +1: each point's nearest neighbour is itself

    def coverage(points, manifold, r):
        return (torch.cdist(points, manifold) <= r[None, :]).any(dim=1).float().mean().item()

    real, fake = real.double(), fake.double()
    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def compute(names: list[str], real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor | None) -> dict:
    """The registry: eval.metrics names -> values."""
    out = {}
    for name in names:
        if name == "fid":
            out["fid"] = fid(real, fake)
        elif name == "kid":
            out["kid"] = kid(real, fake)
        elif name == "is":
            if fake_logits is None:
                raise EvalError("eval.metrics: 'is' needs class logits (eval.features: classifier)")
            out["is"] = inception_score(fake_logits)
        elif name == "pr":
            out["precision"], out["recall"] = precision_recall(real, fake)
        else:
            raise EvalError(f"eval.metrics: unknown metric {name!r}")
    return out


# --------------------------------------------------------------------------- 2-D mixtures: mode coverage
# The protocol of the mode-collapse papers (VEEGAN, Srivastava et al. 2017; PacGAN, Lin et al. 2018):
# a sample is high quality within 3 std of its nearest mode; a mode is covered when at least one
# high-quality sample is nearest to it; KL of the high-quality samples' mode histogram against the
# uniform one. Scores are means over several independent sample sets, as the papers report them.

MODE_METRICS = ("modes", "hq", "kl")
MODE_SET_SIZE = 2500  # samples per set in the papers' tables
MODE_SETS = 5


def mode_coverage(points: torch.Tensor, centres: torch.Tensor, std: float, radius: float = 3.0) -> dict:
    """modes covered (count), hq (fraction of high-quality samples) and kl for one sample set."""
    dist = torch.cdist(points.double(), centres.double())
    nearest_dist, nearest = dist.min(dim=1)
    hq = nearest_dist <= radius * std
    k = len(centres)
    counts = torch.bincount(nearest[hq], minlength=k).double()
    if counts.sum() == 0:
        # No high-quality sample at all: scored like a collapse onto one mode, the largest
        # finite value the KL against uniform takes (log K), so means stay finite.
        kl = math.log(k)
    else:
        p = counts / counts.sum()
        nz = p > 0
        kl = float((p[nz] * (p[nz] * k).log()).sum())
    return {"modes": float((counts > 0).sum()), "hq": float(hq.double().mean()), "kl": kl}


@torch.no_grad()
def mixture_samples(g, spec: JobSpec, n: int, seed: int, device="cpu") -> torch.Tensor:
    """n generated points from noise seeded by `seed` (each set gets its own)."""
    from rayganx.models import generate

    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, spec.model.latent_dim, generator=gen).to(device)
    return generate(g, z).reshape(n, -1).float().cpu()


def mode_metrics(g, spec: JobSpec, names: list[str], num_samples: int = MODE_SET_SIZE, sets: int = MODE_SETS,
                 seed: int = 0, device="cpu") -> dict:
    """The mode-coverage metrics of a 2-D generator, averaged over `sets` sets of `num_samples`."""
    from rayganx.data import mixture_geometry

    unknown = [n for n in names if n not in MODE_METRICS]
    if unknown:
        raise EvalError(f"eval.metrics: {', '.join(unknown)} do not apply to 2-D points (use {', '.join(MODE_METRICS)})")
    centres, std = mixture_geometry(spec.data.mixture)
    centres = torch.from_numpy(centres)
    scores = [mode_coverage(mixture_samples(g, spec, num_samples, seed * 100_003 + i, device), centres, std)
              for i in range(sets)]
    return {name: sum(s[name] for s in scores) / sets for name in names}


# --------------------------------------------------------------------------- features of images


@torch.no_grad()
def features_of(extractor: Extractor, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    feats, logits = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        feats.append(extractor(x).float().cpu())
        if extractor.has_logits:
            logits.append(extractor.logits(x).float().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


CHUNK = 250  # samples per seeded chunk: the unit of work split across workers


def chunks(n: int) -> list[tuple[int, int]]:
    """(index, size) of each seeded chunk of n samples."""
    return [(i, min(CHUNK, n - i * CHUNK)) for i in range((n + CHUNK - 1) // CHUNK)]


@torch.no_grad()
def chunk_features(g, spec: JobSpec, num_classes, extractor, index: int, size: int, seed: int, device="cpu"):
    """Features (and logits) of one chunk: noise seeded by (seed, index), so any worker makes the same images."""
    from rayganx.models import generate

    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    z = torch.randn(size, spec.model.latent_dim, generator=gen).to(device)
    y = None
    if spec.model.conditional and num_classes:
        y = (torch.arange(index * CHUNK, index * CHUNK + size) % num_classes).to(device)
    return features_of(extractor, generate(g, z, y))


def generated_features(g, spec: JobSpec, num_classes, extractor, n: int, seed: int, device="cpu",
                       rank: int = 0, world: int = 1):
    """This worker's share (chunks rank, rank+world, ...) of n generated samples' features."""
    return {i: chunk_features(g, spec, num_classes, extractor, i, size, seed, device)
            for i, size in chunks(n)[rank::world]}


def assemble(parts: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Join the chunks gathered from all workers in index order (the single-process order)."""
    merged = {i: v for part in parts for i, v in part.items()}
    feats = torch.cat([merged[i][0] for i in sorted(merged)])
    logits = [merged[i][1] for i in sorted(merged)]
    return feats, (torch.cat(logits) if logits[0] is not None else None)


def stats_key(spec: JobSpec) -> str:
    """Identifies real-data features: dataset, image size, channels and extractor."""
    d, e = spec.data, spec.eval
    ident = json.dumps([d.source, d.path, d.mixture, d.image_size, d.channels, d.crop, e.features, e.extractor])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def real_features(spec: JobSpec, extractor: Extractor, limit: int) -> torch.Tensor:
    """Real-data features, from the storage cache (<storage>/_stats/) or computed once and cached."""
    import ray

    from rayganx import data as rdata
    from rayganx.storage import Store

    store = Store(spec.storage.path, spec.storage.endpoint_url)
    name = f"real_{stats_key(spec)}_{limit}.pt"
    if store.exists("_stats", name):
        with store.fs.open(store.path("_stats", name), "rb") as f:
            return torch.load(f, weights_only=True)
    if not ray.is_initialized():
        from rayganx.runner import init_ray

        init_ray()
    feats, seen = [], 0
    for batch in rdata.build(spec.data, "all").iter_torch_batches(batch_size=256):
        feats.append(features_of(extractor, rdata.model_input(batch["image"]))[0])
        seen += len(batch["image"])
        if seen >= limit:
            break
    real = torch.cat(feats)[:limit]
    buf = io.BytesIO()
    torch.save(real, buf)
    store.write_bytes(buf.getvalue(), "_stats", name)
    return real


def evaluate_generator(g, spec: JobSpec, num_classes, metrics: list[str], num_samples: int, seed: int = 0) -> dict:
    """Single-process evaluation of a generator against the job's data (the CLI path)."""
    if spec.data.source == "gaussian_mixture":
        return mode_metrics(g, spec, metrics, num_samples, spec.eval.sample_sets, seed)
    extractor = load_extractor(spec.eval, spec.data.channels, spec.storage.endpoint_url)
    real = real_features(spec, extractor, max(num_samples, 2))
    fake, logits = assemble([generated_features(g, spec, num_classes, extractor, num_samples, seed)])
    return compute(metrics, real, fake, logits)
