"""A generator scored against its job's data: during training (`Evaluator`, every worker its
share), from the command line (`evaluate_generator`, in this process), and across the cluster
(`--workers`: sample generation and feature extraction sharded over Ray Data actors, the features
gathered, the metrics computed once).

The work is cut into the seeded chunks of `rayganx.evaluation.metrics` (chunk i's noise comes from
(seed, i)), so any actor makes the same images for a chunk, and 1 worker or N give the same
features in the same order: the same scores, within floating-point tolerance. Each actor loads
the generator and the extractor once (a GPU each with --gpu). Real-data features go the same way,
once per (dataset fingerprint, extractor identity, image size), cached in the store.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import torch

from rayganx.evaluation.extractors import Extractor, features_of, load_extractor
from rayganx.evaluation.metrics import (assemble, check_cas, check_request, classification_accuracy_score, compute,
    generated_features, mode_metrics, real_splits, stats_key)
from rayganx.job.sections import EvalSpec
from rayganx.job.spec import JobSpec


class GeneratedFeatures:
    """A Ray Data actor: features (and logits) of the chunks it is handed, from a checkpoint's generator."""

    def __init__(self, checkpoint: str, endpoint_url: str | None, ev: dict, seed: int, gpu: bool):
        from rayganx.models.trained import open_generator

        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        g, spec, self.num_classes = open_generator(checkpoint, endpoint_url)
        self.g, self.spec, self.seed = g.to(self.device), spec, seed
        self.extractor = load_extractor(EvalSpec.model_validate(ev), spec.data.channels, endpoint_url).to(self.device)

    def __call__(self, batch: dict) -> dict:
        from rayganx.evaluation.metrics import chunk_features

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
        from rayganx.data.sources import model_input

        images = model_input(torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device))
        f, _ = features_of(self.extractor, images)
        return {"features": f.numpy()}


def _actors(workers: int, gpu: bool) -> dict:
    return {"concurrency": workers, "num_gpus": 1 if gpu else 0, "num_cpus": 1}


def cluster_generated_features(checkpoint: str, spec: JobSpec, n: int, seed: int, workers: int, gpu: bool = False,
                       endpoint_url: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n generated samples' features (and logits), made by `workers` actors, in chunk order."""
    import ray

    from rayganx.evaluation.metrics import chunks

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


def cluster_real_features(spec: JobSpec, limit: int, workers: int, gpu: bool = False) -> torch.Tensor:
    """The first `limit` real images' features (in the dataset's own order), by `workers` actors."""
    from rayganx.data.sources import build, canonical

    ds = build(spec.data, "all").limit(limit)
    ds = canonical(ds.map_batches(RealFeatures, batch_size=256, batch_format="numpy",
                                  fn_constructor_kwargs={"ev": spec.eval.model_dump(mode="json"),
                                                         "channels": spec.data.channels,
                                                         "endpoint_url": spec.storage.endpoint_url, "gpu": gpu},
                                  **_actors(workers, gpu)))
    return torch.from_numpy(np.concatenate([b["features"] for b in ds.iter_batches(batch_size=None,
                                                                                   batch_format="numpy")]))


def real_features(spec: JobSpec, extractor: Extractor, limit: int, verbose: bool = False, workers: int | None = None,
                  gpu: bool = False) -> torch.Tensor:
    """Real-data features, from the storage cache (<storage>/_stats/) or computed once and cached;
    workers: by that many Ray Data actors across the cluster (`cluster_real_features`)."""
    import ray

    from rayganx.data import sources as rdata
    from rayganx.store.storage import Store

    store = Store(spec.storage.path, spec.storage.endpoint_url)
    name = f"real_{stats_key(spec, extractor)}_{limit}.pt"
    if store.exists("_stats", name):
        with store.fs.open(store.path("_stats", name), "rb") as f:
            return torch.load(f, weights_only=True)
    if not ray.is_initialized():
        from rayganx.job.cluster import init_ray

        init_ray(verbose=verbose)
    if workers:
        real = cluster_real_features(spec, limit, workers, gpu)
    else:
        feats, seen = [], 0
        for batch in rdata.build(spec.data, "all").iter_torch_batches(batch_size=256):
            images = batch["image"][:limit - seen]  # past the limit they would be extracted for nothing
            feats.append(features_of(extractor, rdata.model_input(images))[0])
            seen += len(images)
            if seen >= limit:
                break
        real = torch.cat(feats)
    buf = io.BytesIO()
    torch.save(real, buf)
    store.write_bytes(buf.getvalue(), "_stats", name)
    return real


def evaluate_generator(g, spec: JobSpec, num_classes, metrics: list[str], num_samples: int, seed: int = 0,
                       verbose: bool = False, cas_steps: int | None = None, checkpoint: str | None = None,
                       workers: int | None = None, gpu: bool = False) -> dict:
    """Evaluation of a generator against the job's data (the CLI path): in this process, or with
    `workers` Ray Data actors across the cluster making and extracting the samples of `checkpoint`.
    cas_steps: the CAS classifiers' steps (default CAS_RECIPE's)."""
    if spec.data.source == "gaussian_mixture":
        return mode_metrics(g, spec, metrics, num_samples, spec.eval.sample_sets, seed)
    check_request(metrics, spec.eval)
    out = {}
    if "cas" in metrics:
        check_cas(spec, num_classes)  # refused before any feature is extracted
    if any(n != "cas" for n in metrics):
        extractor = load_extractor(spec.eval, spec.data.channels, spec.storage.endpoint_url)
        real = real_features(spec, extractor, max(num_samples, 2), verbose, workers, gpu)
        if workers and checkpoint:
            fake, logits = cluster_generated_features(checkpoint, spec, num_samples, seed, workers, gpu,
                                                      spec.storage.endpoint_url)
        else:
            fake, logits = assemble([generated_features(g, spec, num_classes, extractor, num_samples, seed)])
        out = compute(metrics, real, fake, logits)
    if "cas" in metrics:
        out |= classification_accuracy_score(g, spec, num_classes, real_splits(spec, verbose), seed=seed,
                                             steps=cas_steps)
    return out


class Evaluator:
    """Sample-quality metrics during training: every worker generates and extracts its share."""

    def __init__(self, spec: JobSpec, config: dict, rank: int, world: int, device):
        from rayganx.evaluation import metrics as m
        from rayganx.evaluation.extractors import load_extractor

        self.m, self.spec, self.rank, self.world, self.device = m, spec, rank, world, device
        self.num_classes = config["num_classes"]
        self.points = spec.data.source == "gaussian_mixture"
        if self.points:  # scored against the mixture's known modes: no extractor, no real features
            return
        self.extractor = load_extractor(spec.eval, spec.data.channels, spec.storage.endpoint_url).to(device)
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
        if self.world > 1:
            # Each worker's BatchNorm running statistics are its own (buffers are not broadcast in
            # training); the score must be the checkpointed generator's, rank 0's, so every
            # worker generates its share with a copy holding rank 0's buffers.
            g = copy.deepcopy(g)
            for buf in g.buffers():
                dist.broadcast(buf, src=0)
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
