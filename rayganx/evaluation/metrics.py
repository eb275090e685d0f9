"""Evaluation: the sample-quality metrics, computed from features (`rayganx.evaluation.extractors`).

Images go through an extractor once; metrics take features. FID, KID and IS come from
torchmetrics (fed precomputed features through an identity "network"); improved
precision/recall (Kynkäänniemi et al. 2019), which torchmetrics lacks, is written here.
Real-data features are computed once per dataset, extractor and image size and cached in storage.
The standard FID Inception network and its weights live in rayganx.evaluation.inception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from rayganx.models.randomness import isolated
from rayganx.evaluation.extractors import EvalError, Extractor, features_of
from rayganx.job.metric_names import IMAGE_METRICS, MODE_METRICS
from rayganx.job.sections import FEATURES_WITH_LOGITS, IS_NEEDS_LOGITS, EvalSpec
from rayganx.job.spec import JobSpec, from_dict


# --------------------------------------------------------------------------- metrics


class _Precomputed(nn.Identity):
    """Lets torchmetrics' image metrics take features we already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


# Features are gathered before the metrics run on one rank: torchmetrics must not sync across
# the training process group itself (it would wait forever for the other ranks).
LOCAL = {"sync_on_compute": False}


def check_request(names: list[str], ev: EvalSpec) -> None:
    """Refuse, before any work, metrics the extractor cannot give."""
    unknown = [n for n in names if n not in IMAGE_METRICS]
    if unknown:
        raise EvalError(f"eval.metrics: unknown metric {unknown[0]!r} (expected {', '.join(IMAGE_METRICS)})")
    if "is" in names and ev.features not in FEATURES_WITH_LOGITS:
        raise EvalError(IS_NEEDS_LOGITS.format(features=ev.features))


@contextlib.contextmanager
def _quiet():
    """Warnings about choices made here on purpose. torchmetrics says KID and IS keep every feature
    in memory: that is the point (they are extracted already, bounded by eval.num_samples). And IS
    over one split has no standard deviation, which torch warns about; only the mean is reported."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*will save all extracted features in buffer")
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom is <= 0")
        yield


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=False, **LOCAL)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return float(m.compute())


def kid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = min(len(real), len(fake), 1000)
    with _quiet():
        m = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subset_size=subset, subsets=50, **LOCAL)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    with isolated():  # KID averages random subsets: fixed, so equal inputs give equal scores; the caller's
        torch.manual_seed(0)  # streams (a training run's) stay where they were
        return float(m.compute()[0])


def inception_score(fake_logits: torch.Tensor) -> float:
    from torchmetrics.image.inception import InceptionScore

    with _quiet():
        m = InceptionScore(feature=_Precomputed(fake_logits.shape[1]), splits=1, **LOCAL)
    m.update(fake_logits.double())
    with _quiet():
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
                raise EvalError(IS_NEEDS_LOGITS.format(features="these"))
            out["is"] = inception_score(fake_logits)
        elif name == "pr":
            out["precision"], out["recall"] = precision_recall(real, fake)
        elif name == "cas":  # not a feature metric: classification_accuracy_score trains a classifier
            continue
        else:
            raise EvalError(f"eval.metrics: unknown metric {name!r}")
    return out


# --------------------------------------------------------------------------- 2-D mixtures: mode coverage
# The protocol of the mode-collapse papers (VEEGAN, Srivastava et al. 2017; PacGAN, Lin et al. 2018):
# a sample is high quality within 3 std of its nearest mode; a mode is covered when at least one
# high-quality sample is nearest to it; KL of the high-quality samples' mode histogram against the
# uniform one. Scores are means over several independent sample sets, as the papers report them.

MODE_SET_SIZE = 2500  # samples per set in the papers' tables
MODE_SETS = 5


def mode_coverage(points: torch.Tensor, centres: torch.Tensor, std: float, radius: float = 3.0) -> dict:
    """modes covered (count), hq (fraction of high-quality samples), kl, and width: the RMS distance
    of the high-quality samples to their mode over the data's (exact samples of the mixture: 1;
    a generator that buys precision by drawing narrower clusters than the data's: below 1)."""
    dist = torch.cdist(points.double(), centres.double())
    nearest_dist, nearest = dist.min(dim=1)
    hq = nearest_dist <= radius * std
    k = len(centres)
    counts = torch.bincount(nearest[hq], minlength=k).double()
    if counts.sum() == 0:
        # No high-quality sample at all: scored like a collapse onto one mode, the largest
        # finite value the KL against uniform takes (log K), so means stay finite.
        kl, width = math.log(k), 0.0
    else:
        p = counts / counts.sum()
        nz = p > 0
        kl = float((p[nz] * (p[nz] * k).log()).sum())
        spread = 2 - radius ** 2 * math.exp(-radius ** 2 / 2) / (1 - math.exp(-radius ** 2 / 2))
        width = float((nearest_dist[hq] / std).pow(2).mean().div(spread).sqrt())
    return {"modes": float((counts > 0).sum()), "hq": float(hq.double().mean()), "kl": kl, "width": width}


@torch.no_grad()
def mixture_samples(g, spec: JobSpec, n: int, seed: int, device="cpu") -> torch.Tensor:
    """n generated points from noise seeded by `seed` (each set gets its own)."""
    from rayganx.models.networks import generate

    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, spec.model.latent_dim, generator=gen).to(device)
    return generate(g, z).reshape(n, -1).float().cpu()


def mode_metrics(g, spec: JobSpec, names: list[str], num_samples: int = MODE_SET_SIZE, sets: int = MODE_SETS,
                 seed: int = 0, device="cpu") -> dict:
    """The mode-coverage metrics of a 2-D generator, averaged over `sets` sets of `num_samples`."""
    from rayganx.data.points import mixture_geometry

    unknown = [n for n in names if n not in MODE_METRICS]
    if unknown:
        raise EvalError(f"eval.metrics: {', '.join(unknown)} do not apply to 2-D points (use {', '.join(MODE_METRICS)})")
    centres, std = mixture_geometry(spec.data.mixture)
    centres = torch.from_numpy(centres)
    scores = [mode_coverage(mixture_samples(g, spec, num_samples, seed * 100_003 + i, device), centres, std)
              for i in range(sets)]
    return {name: sum(s[name] for s in scores) / sets for name in names}


# --------------------------------------------------------------------------- features of images

CHUNK = 250  # samples per seeded chunk: the unit of work split across workers


def chunks(n: int) -> list[tuple[int, int]]:
    """(index, size) of each seeded chunk of n samples."""
    return [(i, min(CHUNK, n - i * CHUNK)) for i in range((n + CHUNK - 1) // CHUNK)]


@torch.no_grad()
def chunk_features(g, spec: JobSpec, num_classes, extractor, index: int, size: int, seed: int, device="cpu"):
    """Features (and logits) of one chunk: noise seeded by (seed, index), so any worker makes the same images."""
    from rayganx.models.networks import generate

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


def stats_key(spec: JobSpec, extractor: Extractor) -> str:
    """Identifies real-data features by content: the dataset's fingerprint (its files and sizes,
    wherever they are) and the extractor's identity (its weights), with the image size."""
    from rayganx.data.sources import fingerprint

    d = spec.data
    # classes and per_class choose the rows the features are of: FID on digits 5-9 must not read
    # the features of all ten from the cache
    ident = json.dumps([fingerprint(d), d.image_size, d.channels, d.crop, getattr(extractor, "identity", None)]
                       + ([d.classes, d.per_class] if d.classes is not None or d.per_class is not None else []))
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- Classification Accuracy Score
# Ravuri & Vinyals 2019: train a classifier on generated images only, as many per class as the real
# training set has, and test it on real held-out images; the same classifier trained on the real
# training set is the reference (ImageNet 256 px, ResNet-50: real 73.1% top-1, BigGAN-deep 42.7%,
# VQ-VAE-2 54.8%). Here the classifier is the project's CNN with the recipe of jobs/cnn_digits.yaml
# (width 32, Adam 1e-3, batch 64, 400 steps), trained in this process: a few seconds on digits.

CAS_RECIPE = {"model": {"kind": "cnn", "ndf": 32},
              "train": {"batch_size": 64, "steps": 400, "optim": {"lr": 1e-3, "betas": [0.9, 0.999]}}}


def check_cas(spec: JobSpec, num_classes) -> None:
    """CAS needs labelled images from a class-conditional generator: refused in one line otherwise."""
    if spec.data.source == "gaussian_mixture":
        raise EvalError("eval.metrics: cas scores class-conditional image generators; this job's are 2-D points")
    if not (spec.model.conditional and num_classes):
        raise EvalError("eval.metrics: cas (Classification Accuracy Score) needs a class-conditional generator "
                        "(model.conditional: true); this one draws no labels")


def real_splits(spec: JobSpec, verbose: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The job's real labelled images as uint8 tensors: "train" (its training split, data.per_class
    applied) and "val" (the held-out split, which no training here ever reads)."""
    import ray

    from rayganx.data import sources as rdata

    if not ray.is_initialized():
        from rayganx.job.cluster import init_ray

        init_ray(verbose=verbose)
    out = {}
    for split in ("train", "val"):
        xs, ys = [], []
        for batch in rdata.build(spec.data, split).iter_torch_batches(batch_size=1024):
            xs.append(batch["image"])
            ys.append(batch["label"])
        out[split] = (torch.cat(xs), torch.cat(ys))
    return out


def fit_classifier(images: torch.Tensor, labels: torch.Tensor, spec: JobSpec, num_classes: int,
                   seed: int = 0, steps: int | None = None) -> nn.Module:
    """The project's CNN trained with CAS_RECIPE on uint8 images, in this process, one epoch after
    another in seeded orders; returned in eval mode."""
    from rayganx.data.sources import model_input
    from rayganx.models.networks import build

    cnn = from_dict({"name": "cas", "data": spec.data.model_dump(mode="json") | {"synthetic": None}} | CAS_RECIPE,
                    "cas")
    t = cnn.train
    torch.manual_seed(seed)
    net = build(cnn, num_classes)["net"].train()
    opt = torch.optim.Adam(net.parameters(), lr=t.optim.lr, betas=tuple(t.optim.betas))
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    batch = min(t.batch_size, n)
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps or t.steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        loss = F.cross_entropy(net(model_input(images[idx])), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    from rayganx.data.sources import model_input

    correct = sum(int((net(model_input(images[i:i + 512])).argmax(1) == labels[i:i + 512]).sum())
                  for i in range(0, len(images), 512))
    return correct / max(1, len(images))


@torch.no_grad()
def generated_like(g, spec: JobSpec, labels: torch.Tensor, seed: int = 0, device="cpu") -> torch.Tensor:
    """One generated image for each label in `labels` (so as many per class), as uint8: quantised as
    saved images are, which is what the classifier of the protocol trains on."""
    from rayganx.models.images import to_uint8
    from rayganx.models.networks import generate

    gen = torch.Generator().manual_seed(seed * 100_003 + 7)
    z = torch.randn(len(labels), spec.model.latent_dim, generator=gen)
    was_training = g.training
    g.eval()
    out = [torch.from_numpy(to_uint8(generate(g, z[i:i + 256].to(device), labels[i:i + 256].to(device))))
           for i in range(0, len(labels), 256)]
    g.train(was_training)
    return torch.cat(out)


def classification_accuracy_score(g, spec: JobSpec, num_classes: int, real: dict, seed: int = 0,
                                  steps: int | None = None, device="cpu") -> dict:
    """cas: real held-out accuracy of the CNN trained on generated images only (as many per class
    as the real training split holds); cas_real: the same CNN, same recipe, trained on that real
    split: the reference row."""
    check_cas(spec, num_classes)
    (x_train, y_train), (x_val, y_val) = real["train"], real["val"]
    if not len(x_val):
        raise EvalError("eval.metrics: cas tests on the held-out split, and data.val_fraction leaves none")
    fake = generated_like(g, spec, y_train, seed, device).cpu()
    with isolated():  # in training: the run's own noise streams go on untouched
        on_fake = fit_classifier(fake, y_train, spec, num_classes, seed, steps)
        on_real = fit_classifier(x_train, y_train, spec, num_classes, seed, steps)
    return {"cas": accuracy(on_fake, x_val, y_val), "cas_real": accuracy(on_real, x_val, y_val)}
