"""`rayganx eval` across the cluster: sample generation and feature extraction sharded over Ray Data
actors, the features gathered, the metrics computed once.

The work is cut into the seeded chunks of `rayganx.metrics` (chunk i's noise comes from
(seed, i)), so any actor makes the same images for a chunk, and 1 worker or N give the same
features in the same order: the same scores, within floating-point tolerance. Each actor loads
the generator and the extractor once (a GPU each with --gpu). Real-data features go the same way,
once per (dataset fingerprint, extractor identity, image size), cached in the store.
"""

from __future__ import annotations

import numpy as np
import torch

from rayganx.extractors import features_of, load_extractor
from rayganx.spec import EvalSpec, JobSpec


class GeneratedFeatures:
    """A Ray Data actor: features (and logits) of the chunks it is handed, from a checkpoint's generator."""

    def __init__(self, checkpoint: str, endpoint_url: str | None, ev: dict, seed: int, gpu: bool):
        from rayganx.models import open_generator

        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        g, spec, self.num_classes = open_generator(checkpoint, endpoint_url)
        self.g, self.spec, self.seed = g.to(self.device), spec, seed
        self.extractor = load_extractor(EvalSpec.model_validate(ev), spec.data.channels, endpoint_url).to(self.device)

    def __call__(self, batch: dict) -> dict:
        from rayganx.metrics import chunk_features

        out: dict = {"index": [], "features": [], "logits": []}
        for index, size in zip(batch["index"], batch["size"]):
            f, lg = chunk_features(self.g, self.spec, self.num_classes, self.extractor, int(index), int(size),
                                   self.seed, self.device)
            out["index"].append(int(index))
            out["features"].append(f.numpy())
            out["logits"].append(lg.numpy() if lg is not None else np.zeros((len(f), 0), np.float32))
        return out


class RealFeatures:
    """A Ray Data actor: features of decoded real images, in the order it is handed them."""

    def __init__(self, ev: dict, channels: int, endpoint_url: str | None, gpu: bool):
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        self.extractor = load_extractor(EvalSpec.model_validate(ev), channels, endpoint_url).to(self.device)

    def __call__(self, batch: dict) -> dict:
        from rayganx.data import model_input

        images = model_input(torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device))
        f, _ = features_of(self.extractor, images)
        return {"features": f.numpy()}


def _actors(workers: int, gpu: bool) -> dict:
    return {"concurrency": workers, "num_gpus": 1 if gpu else 0, "num_cpus": 1}


def generated_features(checkpoint: str, spec: JobSpec, n: int, seed: int, workers: int, gpu: bool = False,
                       endpoint_url: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n generated samples' features (and logits), made by `workers` actors, in chunk order."""
    import ray

    from rayganx.metrics import chunks

    items = [{"index": i, "size": size} for i, size in chunks(n)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(GeneratedFeatures, batch_size=1, batch_format="numpy",
                        fn_constructor_kwargs={"checkpoint": checkpoint, "endpoint_url": endpoint_url,
                                               "ev": spec.eval.model_dump(mode="json"), "seed": seed, "gpu": gpu},
                        **_actors(workers, gpu))
    rows = sorted(ds.take_all(), key=lambda r: r["index"])
    feats = torch.from_numpy(np.concatenate([r["features"] for r in rows]))
    logits = np.concatenate([r["logits"] for r in rows])
    return feats, (torch.from_numpy(logits) if logits.shape[1] else None)


def real_features(spec: JobSpec, limit: int, workers: int, gpu: bool = False) -> torch.Tensor:
    """The first `limit` real images' features (in the dataset's own order), by `workers` actors."""
    from rayganx.data import build, canonical

    ds = build(spec.data, "all").limit(limit)
    ds = canonical(ds.map_batches(RealFeatures, batch_size=256, batch_format="numpy",
                                  fn_constructor_kwargs={"ev": spec.eval.model_dump(mode="json"),
                                                         "channels": spec.data.channels,
                                                         "endpoint_url": spec.storage.endpoint_url, "gpu": gpu},
                                  **_actors(workers, gpu)))
    return torch.from_numpy(np.concatenate([b["features"] for b in ds.iter_batches(batch_size=None,
                                                                                   batch_format="numpy")]))
