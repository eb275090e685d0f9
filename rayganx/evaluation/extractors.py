"""Feature extractors for evaluation: a random CNN, a rayganx classifier, a pinned TorchScript
file, or the standard FID Inception network (`rayganx.evaluation.inception`), and batched features of images.
Nothing read is executed: checkpoints load weights only, TorchScript only with its SHA-256.
"""

from __future__ import annotations

import hashlib
import io

import torch
import torch.nn.functional as F
from torch import nn

from rayganx.job.errors import UserError
from rayganx.job.sections import IS_NEEDS_LOGITS, EvalSpec
from rayganx.job.spec import from_dict


class EvalError(UserError, ValueError):
    """An evaluation set-up problem (extractor missing or unreadable), in one line."""


# --------------------------------------------------------------------------- extractors


class Extractor(nn.Module):
    """images in [-1, 1] (N, C, H, W) -> features (N, D); `logits` when it has class outputs."""

    has_logits = False
    batch = 256  # images per forward pass in features_of

    def logits(self, x):  # pragma: no cover - only classifier and inception extractors have logits
        raise EvalError(IS_NEEDS_LOGITS.format(features=type(self).__name__))

    def features_and_logits(self, x):
        return self(x), (self.logits(x) if self.has_logits else None)


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


class InceptionFeatures(Extractor):
    """The standard FID Inception (rayganx.evaluation.inception): 2048-d pool features, ImageNet logits for IS."""

    has_logits = True
    batch = 64  # 299 x 299 activations: 256 images at once would take gigabytes

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def _u8(self, x):
        # Quantised as a saved PNG would be, which is what published scores were computed on.
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round()
        return u8.repeat(1, 3, 1, 1) if u8.shape[1] == 1 else u8

    def forward(self, x):
        return self.net(self._u8(x))

    def logits(self, x):
        return self.net.logits(self(x))

    def features_and_logits(self, x):
        pool = self(x)  # one pass for both: the network is the expensive part
        return pool, self.net.logits(pool)


def _check_pinned(url: str, data: bytes, sha256: str | None) -> None:
    """A TorchScript file is a program: it is loaded only when its bytes are the ones the job pinned."""
    got = hashlib.sha256(data).hexdigest()
    if not sha256:
        raise EvalError(f"eval.extractor_sha256: required with features torchscript, whose file is a program; "
                        f"{url} has SHA-256 {got}: pin it if you trust that file")
    if got != sha256.lower():
        raise EvalError(f"eval.extractor: {url} has SHA-256 {got}, expected {sha256.lower()} (eval.extractor_sha256)")


def load_extractor(ev: EvalSpec, channels: int, endpoint_url: str | None = None) -> Extractor:
    """Build the job's extractor; a missing or unreadable file is a clear error. Its `identity` is
    a hash of what it computes (its weights, or its pinned file), not of where it was read from:
    cached real-data features are keyed by it."""
    ex = _load_extractor(ev, channels, endpoint_url)
    if ev.features == "random":
        ex.identity = f"random-cnn/1/{channels}"
    elif ev.features == "inception":
        from rayganx.evaluation.inception import expected_sha256

        ex.identity = f"inception/{expected_sha256()}"
    elif ev.features == "torchscript":
        ex.identity = f"torchscript/{ev.extractor_sha256.lower()}"
    else:
        h = hashlib.sha256()
        for k, v in sorted(ex.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        ex.identity = f"classifier/{h.hexdigest()}"
    return ex


def _load_extractor(ev: EvalSpec, channels: int, endpoint_url: str | None = None) -> Extractor:
    if ev.features == "random":
        return RandomCNN(channels)
    if ev.features == "inception":
        from rayganx.evaluation import inception

        try:
            return InceptionFeatures(inception.load(ev.inception_path, endpoint_url))
        except inception.InceptionError as e:
            raise EvalError(str(e)) from None
    from rayganx.store.storage import Store, StorageError

    url = ev.extractor
    try:
        store = Store(url, endpoint_url)
        if not store.exists():
            raise EvalError(f"eval.extractor: {url} does not exist")
        if ev.features == "torchscript":
            with store.fs.open(store.root, "rb") as f:
                data = f.read()
            _check_pinned(url, data, ev.extractor_sha256)
            return TorchScriptFeatures(torch.jit.load(io.BytesIO(data), map_location="cpu"))
        from rayganx.models.networks import build
        from rayganx.store.runs import load_state

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


@torch.no_grad()
def features_of(extractor: Extractor, images: torch.Tensor, batch: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    feats, logits = [], []
    batch = batch or extractor.batch
    for i in range(0, len(images), batch):
        f, lg = extractor.features_and_logits(images[i:i + batch])
        feats.append(f.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)
