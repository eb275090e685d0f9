"""The sections of a job spec: each one's keys, types, defaults and descriptions (the rules
between sections are `rayganx.job.spec.check`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rayganx.job.metric_names import EVAL_METRICS

GAN_KINDS = ("mlp_gan", "dcgan", "resnet_gan")
# user:password@ in a URL (s3://key:secret@bucket, http://user:pass@minio:9000)
URL_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")
# Data sources that read data.path (the others generate their data in the package).
PATH_SOURCES = ("image_folder", "parquet", "celeba")


class Section(BaseModel):
    # "constants": an infinite or NaN value in a free-form field (a sweep's space) stays a float
    # through model_dump(mode="json"); pydantic's default turns it into None there.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="constants")


class ModelSpec(Section):
    kind: Literal["mlp_gan", "dcgan", "resnet_gan", "cnn", "vae"] = "dcgan"
    latent_dim: int = Field(100, ge=1)
    ngf: int = Field(64, ge=1, description="generator width (DCGAN/ResNet/VAE decoder)")
    ndf: int = Field(64, ge=1, description="discriminator width (and CNN/VAE encoder)")
    hidden: list[int] = Field(default_factory=lambda: [128, 128], description="mlp_gan hidden sizes")
    conditional: bool = Field(False, description="class-conditional GAN: needs data.labels")
    spectral_norm: Literal["none", "d", "g", "both"] = "none"
    d_batchnorm: bool = Field(True, description="BatchNorm in the DCGAN discriminator")
    sync_batchnorm: bool = Field(False, description="BatchNorm statistics over the global batch (GPU workers)")
    pack: int = Field(1, ge=1, description="PacGAN packing: D judges m samples at once, concatenated "
                                           "along channels (images) or features (points)")
    latent_components: int = Field(0, ge=0, description="mlp_gan: a latent prior of K unit Gaussians with fixed "
                                                        "random means instead of one; 0: one Gaussian")
    latent_spread: float = Field(2.0, gt=0, description="std of the fixed component means (latent_components)")
    fourier_features: int = Field(0, ge=0, description="mlp_gan on 2-D points: D also sees sin and cos of F random "
                                                       "projections of each point (0: raw coordinates only)")
    fourier_scale: float = Field(1.0, gt=0, description="std of the random frequencies (cycles per unit) of "
                                                        "fourier_features")


class SyntheticSpec(Section):
    generator: str = Field(description="a conditional generator (checkpoint folder, exported .pt, local or URL) or "
                                       "a folder of `rayganx generate` output")
    fraction: float = Field(gt=0.0, lt=1.0, description="share of the training rows that are generated")


class DataSpec(Section):
    source: Literal["image_folder", "parquet", "celeba", "digits", "gaussian_mixture"] = "digits"
    path: str | None = Field(None, description="local path or fsspec URL (s3://, gs://, ...)")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, ...)")
    image_size: int = Field(32, ge=2)
    channels: Literal[1, 3] = 1
    labels: bool = Field(False, description="read class labels (sub-folders / label column)")
    image_column: str = "image"
    label_column: str = "label"
    crop: int | None = Field(None, ge=1, description="centre crop size before resizing")
    on_corrupt: Literal["fail", "skip"] = "fail"
    mixture: Literal["ring", "ring_pacgan", "grid"] = "ring"
    num_points: int = Field(20000, ge=1, description="gaussian_mixture sample count")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="held out for classifiers")
    cache: bool | Literal["auto"] = Field(
        "auto", description="keep decoded images in Ray's object store after one pass; auto: when they "
                            "take at most a quarter of it")
    per_class: int | None = Field(None, ge=1, description="train on the first k images of each class of the "
                                                          "training split only (low-data runs; GANs too)")
    classes: list[int] | None = Field(None, description="only the images of these classes (label numbers), in "
                                                       "training and evaluation alike: a held-out part of a dataset")
    synthetic: SyntheticSpec | None = Field(None, description="classifiers: mix generated labelled images into "
                                                              "the training rows")


class OptimSpec(Section):
    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = Field(0.0, ge=0)


class TrainSpec(Section):
    batch_size: int = Field(128, ge=1, description="global batch, split across workers")
    steps: int | None = Field(None, ge=1, description="generator (or optimiser) steps")
    epochs: int | None = Field(None, ge=1, description="passes over the data (a GAN's generator step takes d_steps batches)")
    seed: int = Field(0, ge=0)
    loss: Literal["non_saturating", "hinge", "wasserstein", "least_squares"] = "non_saturating"
    d_steps: int = Field(1, ge=1, description="discriminator steps per generator step")
    optim_g: OptimSpec = Field(default_factory=OptimSpec)
    optim_d: OptimSpec = Field(default_factory=OptimSpec)
    optim: OptimSpec = Field(default_factory=lambda: OptimSpec(lr=1e-3, betas=(0.9, 0.999)),
                             description="optimiser of single-network models (cnn, vae)")
    lr_decay: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning rates over the run: constant, or decayed to 0 at train.steps")
    gp_lambda: float = Field(0.0, ge=0, description="WGAN-GP gradient penalty weight")
    gp_every: int = Field(1, ge=1, description="lazy gradient penalty: apply every k discriminator steps, x k")
    r1_gamma: float = Field(0.0, ge=0, description="R1 penalty on reals")
    r1_every: int = Field(1, ge=1, description="lazy R1: apply every k discriminator steps")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA generator decay")
    ema_start: int = Field(0, ge=0)
    ema_rampup: float | None = Field(0.05, gt=0, description="EMA warm-up (StyleGAN2-ADA's ema_rampup)")
    diffaug: list[Literal["translation", "color", "cutout"]] = Field(default_factory=list)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="one-sided, reals only")
    instance_noise: float = Field(0.0, ge=0, description="std of noise on D inputs, annealed to 0")
    grad_clip: float | None = Field(None, gt=0)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast on GPU only")
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the networks (in place: checkpoints unchanged)")
    deterministic: bool = Field(False, description="GPU: deterministic kernels only (torch.use_deterministic_algorithms, "
                                                   "cuDNN deterministic, no autotuning), slower; CPU runs are "
                                                   "bitwise reproducible either way (docs/jobs.md)")
    max_grad_norm: float = Field(1e4, gt=0, description="divergence guard threshold")
    max_rollbacks: int = Field(3, ge=0, description="divergence rollbacks to the last good state before failing")
    rollback_lr_factor: float = Field(0.5, gt=0, le=1, description="learning rates x this at each rollback")
    log_every: int = Field(10, ge=1)


class ScalingSpec(Section):
    num_workers: int | tuple[int, int] = Field(
        2, description="workers, or [MIN, MAX]: elastic, the run goes on with the workers it can get (at least MIN) "
                       "and grows back to MAX as nodes return; Ray sizes it by free resources, not by nodes, so with "
                       "STRICT_SPREAD give each worker a node's worth (cpus_per_worker, a GPU)")
    resize_check_s: float = Field(60.0, gt=0, description="elastic runs: seconds between checks for room to grow")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0)
    memory_per_worker: str | None = Field(None, description="e.g. 8Gi, for Kubernetes")
    max_failures: int = Field(0, ge=-1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers on nodes; STRICT_SPREAD: each on its own node")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def worker_range(self) -> tuple[int, int]:
        return self.num_workers if isinstance(self.num_workers, tuple) else (self.num_workers, self.num_workers)

    @property
    def max_workers(self) -> int:
        return self.worker_range[1]

    @property
    def min_workers(self) -> int:
        return self.worker_range[0]


class StorageSpec(Section):
    path: str = Field("runs", description="local directory or fsspec URL of the run store")
    endpoint_url: str | None = None
    checkpoint_every: int = Field(200, ge=1)
    keep: int = Field(2, ge=1)
    keep_best_by: str | None = Field(None, description="metric to rank checkpoints by, e.g. fid")
    async_upload: bool = Field(True, description="upload checkpoints in the background while training goes on")
    outage_tolerance_s: float = Field(300.0, gt=0, description="how long writes to the store are retried (in the "
                                                              "background) before a run ends for a store outage")


class SamplesSpec(Section):
    every: int = Field(200, ge=1)
    n: int = Field(64, ge=1, description="images in the grid")
    seed: int = 1234


# The Inception Score needs an extractor with class outputs; spec checks and `rayganx eval` say so alike.
FEATURES_WITH_LOGITS = ("classifier", "inception")
IS_NEEDS_LOGITS = ("eval.metrics: 'is' (Inception Score) needs class logits, which '{features}' features lack; "
                   "use features inception, or classifier with a rayganx CNN checkpoint as the extractor")


class EvalSpec(Section):
    every: int | None = Field(None, ge=1, description="evaluate every N steps (off by default)")
    num_samples: int = Field(1000, ge=2, description="generated samples (per set for 2-D jobs; their default: 2500)")
    metrics: list[Literal[tuple(EVAL_METRICS)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["fid", "kid"], description="2-D jobs' default: modes, hq, kl")
    sample_sets: int = Field(5, ge=1, description="2-D jobs: independent sample sets the mode metrics average over")
    features: Literal["classifier", "torchscript", "random", "inception"] = "random"
    extractor: str | None = Field(None, description="classifier checkpoint or TorchScript file")
    extractor_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$",
                                         description="features torchscript: the file's SHA-256, required (the "
                                                     "file is a program)")
    inception_path: str | None = Field(None, description="features inception: the FID Inception weights file "
                                                         "(local or URL); downloaded once into the cache without it")


# The job keys that name files or folders (JobSpec.paths).
PATH_KEYS = ("data.path", "eval.extractor", "eval.inception_path", "storage.path", "data.synthetic.generator")
