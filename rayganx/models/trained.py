"""A trained generator, outside its training run: from a checkpoint or an exported file,
exported (weights plus architecture config, and a torch.export program), sampled from fixed noise.
Weights only, whichever the source: nothing read is executed."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from rayganx.models.networks import build, generate
from rayganx.store.runs import load_state
from rayganx.job.spec import JobSpec, from_dict
from rayganx.store.storage import StorageError, load_bytes

EXPORT_FORMAT = "rayganx-generator/1"


def generator_from_state(state: dict) -> tuple[nn.Module, JobSpec, int | None]:
    """The sampling generator of a checkpoint (the EMA copy when the run kept one), in eval mode."""
    spec = from_dict(state["spec"], "checkpoint")  # ${VAR} placeholders resolve here
    if spec.model.kind not in ("mlp_gan", "dcgan", "resnet_gan", "vae"):
        raise ValueError(f"a {spec.model.kind} checkpoint has no generator")
    name, num_classes = ("net", None) if spec.model.kind == "vae" else ("g", state.get("num_classes"))
    g = build(spec, num_classes)[name]
    g.load_state_dict(state["models"].get("g_ema") or state["models"][name])
    return g.eval(), spec, num_classes


def export_generator(state: dict, path: str, program: str | None = None) -> None:
    """A file that loads with torch and rayganx alone (weights plus architecture config,
    weights_only-safe) and, when `program` names one, a torch.export program that needs torch
    alone: `torch.export.load(p).module()(z)` (`(z, labels)` for a conditional model) gives
    images in [-1, 1], for any batch size."""
    g, spec, num_classes = generator_from_state(state)
    torch.save({"format": EXPORT_FORMAT, "spec": spec.to_dict(), "num_classes": num_classes,
                "step": state.get("step"), "state_dict": g.state_dict()}, path)
    if program:
        z, y, _ = sample_inputs(spec, 2, 0, num_classes)
        batch = torch.export.Dim("batch", min=1)
        args, shapes = ((z, y), ({0: batch}, {0: batch})) if y is not None else ((z,), ({0: batch},))
        torch.export.save(torch.export.export(_Sampler(g, y is not None), args, dynamic_shapes=shapes), program)


class _Sampler(nn.Module):
    def __init__(self, g: nn.Module, conditional: bool):
        super().__init__()
        self.g, self.conditional = g, conditional

    def forward(self, z, y=None):
        return generate(self.g, z, y if self.conditional else None)


def load_generator(path: str) -> tuple[nn.Module, JobSpec, int | None]:
    """Load an exported generator: `g, spec, num_classes = load_generator("generator.pt")`.
    Only tensors and plain data are read (weights_only): nothing in the file is executed."""
    with open(path, "rb") as f:
        blob = load_bytes(f.read(), path)
    if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
        raise StorageError(f"{path}: not a rayganx generator export")
    spec = from_dict(blob["spec"], path)
    g = build(spec, blob["num_classes"])["g" if spec.model.kind != "vae" else "net"]
    g.load_state_dict(blob["state_dict"])
    return g.eval(), spec, blob["num_classes"]


def open_generator(source: str, endpoint_url: str | None = None) -> tuple[nn.Module, JobSpec, int | None]:
    """The sampling generator of an exported .pt file or a complete checkpoint folder (local or
    URL); weights only either way."""
    if source.endswith(".pt") and os.path.isfile(source):
        return load_generator(source)
    return generator_from_state(load_state(source, endpoint_url))


def sample_inputs(spec: JobSpec, n: int, seed: int, num_classes: int | None):
    """Fixed noise, labels (one class per row for conditional models) and the grid's row width."""
    gen = torch.Generator().manual_seed(seed)
    if spec.model.conditional and num_classes:
        per_row = max(1, n // num_classes)
        y = torch.arange(num_classes).repeat_interleave(per_row)
        return torch.randn(len(y), spec.model.latent_dim, generator=gen), y, per_row
    return torch.randn(n, spec.model.latent_dim, generator=gen), None, max(1, int(math.sqrt(n)))


@torch.no_grad()
def sample_images(g: nn.Module, spec: JobSpec, num_classes: int | None, n: int, seed: int,
                  device: torch.device | str = "cpu"):
    """n images in [-1, 1] from fixed noise, and the grid's row width."""
    z, y, per_row = sample_inputs(spec, n, seed, num_classes)
    return generate(g, z.to(device), None if y is None else y.to(device)), per_row
