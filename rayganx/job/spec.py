"""The job spec: one small validated config object that flows into every component.

A job YAML is parsed and checked here before anything starts, so a typo costs seconds, not a
cluster allocation. Errors name the file, the dotted key, what was expected and, for an
unknown key, the closest valid one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from rayganx.job.config import SpecError, describe_error, expand_env, load_yaml, parse_overrides, set_dotted
from rayganx.job.metric_names import EVAL_RESULTS, IMAGE_METRICS, METRIC_MODES, MODE_METRICS
from rayganx.job.sections import (FEATURES_WITH_LOGITS, GAN_KINDS, IS_NEEDS_LOGITS, PATH_KEYS, PATH_SOURCES,
    URL_CREDENTIALS, DataSpec, EvalSpec, ModelSpec, SamplesSpec, ScalingSpec, Section, StorageSpec, TrainSpec)


class JobSpec(Section):
    # dotted key -> the string as written, with its ${VAR} placeholders (see to_dict)
    _templates: dict[str, str] = PrivateAttr(default_factory=dict)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    samples: SamplesSpec = Field(default_factory=SamplesSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @property
    def is_gan(self) -> bool:
        return self.model.kind in GAN_KINDS

    @property
    def run_url(self) -> str:
        """Where this job's checkpoints, samples and metrics live: <storage.path>/<name>."""
        return self.storage.path.rstrip("/") + "/" + self.name

    def paths(self) -> dict[str, str]:
        """The files and folders the job names, by dotted key (a data.path its source does not
        read left out). Where each lives decides who can reach it: Ray workers need local ones
        absolute (they run in their own working directories), a remote cluster none of them."""
        d, e = self.data, self.eval
        named = {"data.path": d.path if d.source in PATH_SOURCES else None, "eval.extractor": e.extractor,
                 "eval.inception_path": e.inception_path, "storage.path": self.storage.path,
                 "data.synthetic.generator": d.synthetic.generator if d.synthetic else None}
        assert set(named) == set(PATH_KEYS)
        return {k: v for k, v in named.items() if v}

    @property
    def per_worker_batch(self) -> int:
        """Each worker's share of the global batch at full size (an elastic run's MAX workers)."""
        return self.train.batch_size // self.scaling.max_workers

    @model_validator(mode="after")
    def _eval_defaults_for_points(self):
        """A 2-D job's evaluation defaults to the mode-coverage protocol: image metrics cannot
        score points, and the papers score sets of 2,500 samples."""
        if self.data.source == "gaussian_mixture":
            if "metrics" not in self.eval.model_fields_set:
                self.eval.metrics = list(MODE_METRICS)
            if "num_samples" not in self.eval.model_fields_set:
                self.eval.num_samples = 2500
        return self

    def to_dict(self, resolved: bool = False) -> dict[str, Any]:
        """The spec as plain data. Values that came from ${VAR} placeholders show the placeholder,
        not the value, unless `resolved`: this is what is stored, printed and shipped, and the
        machine that runs it resolves the placeholders from its own environment."""
        raw = self.model_dump(mode="json")
        if not resolved:
            for key, template in self._templates.items():
                set_dotted(raw, key, template)
        return raw

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def from_dict(raw: dict, source: str = "<job>", overrides: list[str] | None = None) -> JobSpec:
    import copy

    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides):
        set_dotted(raw, key, value)
    templates: dict[str, str] = {}
    try:
        raw = expand_env(raw, templates)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        lines = [describe_error(err, JobSpec) for err in e.errors()]
        raise SpecError(f"{source}: " + f"\n{source}: ".join(lines)) from None
    spec._templates = templates
    problems = check(spec)
    if problems:
        raise SpecError("\n".join(f"{source}: {p}" for p in problems))
    return spec


def load(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    return from_dict(load_yaml(path), str(path), overrides)


# --------------------------------------------------------------------------- cross-field rules


def supported_sizes(kind: str) -> tuple[int, ...] | None:
    """Image sizes an architecture can produce (None: any)."""
    return {"dcgan": (32, 64), "resnet_gan": (32, 64), "vae": (32, 64)}.get(kind)


PER_CLASS_SOURCES = ("digits", "image_folder")


def check(spec: JobSpec) -> list[str]:
    """Rules between keys that pydantic's per-field types cannot state."""
    p: list[str] = []
    m, d, t, s = spec.model, spec.data, spec.train, spec.scaling
    if (t.steps is None) == (t.epochs is None):
        p.append("train.steps / train.epochs: set exactly one of them")
    lo, hi = s.worker_range
    if not 1 <= lo <= hi:
        p.append(f"scaling.num_workers: [MIN, MAX] needs 1 <= MIN <= MAX, got [{lo}, {hi}]")
    uneven = [n for n in range(lo, hi + 1) if t.batch_size % n]
    if uneven and lo >= 1:
        p.append(f"train.batch_size: {t.batch_size} does not split evenly across scaling.num_workers={uneven[0]}"
                 + (f" (an elastic run may run on any count from {lo} to {hi})" if s.elastic else ""))
    sizes = supported_sizes(m.kind)
    if sizes and d.image_size not in sizes:
        p.append(f"data.image_size: {m.kind} produces {' or '.join(map(str, sizes))} px images, "
                 f"got {d.image_size}")
    if d.source in PATH_SOURCES and not d.path:
        p.append(f"data.path: required for source '{d.source}'")
    if d.source == "gaussian_mixture" and m.kind != "mlp_gan":
        p.append(f"data.source: gaussian_mixture holds 2-D points; use model.kind mlp_gan, not {m.kind}")
    if m.kind == "cnn" and not d.labels:
        p.append("data.labels: a cnn classifier needs labels (set data.labels: true)")
    if m.conditional:
        if not d.labels:
            p.append("model.conditional: needs data.labels: true")
        if m.kind not in ("dcgan", "resnet_gan"):
            p.append(f"model.conditional: supported by dcgan and resnet_gan, not {m.kind}")
    if d.classes is not None and (not d.classes or d.source not in PER_CLASS_SOURCES):
        p.append(f"data.classes: a non-empty list of labels, for {' and '.join(PER_CLASS_SOURCES)} data")
    if d.classes and d.source == "image_folder" and not d.labels:
        p.append("data.classes: picks images by class; needs data.labels: true")
    if d.per_class and d.source not in PER_CLASS_SOURCES:
        p.append(f"data.per_class: supported for {' and '.join(PER_CLASS_SOURCES)} data, not {d.source}")
    if d.per_class and not d.labels:
        p.append("data.per_class: picks images by class; needs data.labels: true")
    if d.synthetic:
        if m.kind != "cnn":
            p.append(f"data.synthetic: generated labelled images train classifiers (model.kind: cnn), not {m.kind}")
        if URL_CREDENTIALS.match(d.synthetic.generator):
            p.append("data.synthetic.generator: the URL carries credentials (user:password@); remove them and let "
                     "the environment, a profile or an instance role supply them")
    if "cas" in spec.eval.metrics and spec.eval.every and not m.conditional:
        p.append("eval.metrics: cas (Classification Accuracy Score) needs a class-conditional generator "
                 "(model.conditional: true)")
    if m.sync_batchnorm and hi > 1 and not s.use_gpu:
        p.append("model.sync_batchnorm: PyTorch synchronises BatchNorm on GPUs only "
                 "(set scaling.use_gpu: true, or leave it off on CPU workers)")
    if d.source == "gaussian_mixture" and (t.diffaug or m.conditional):
        p.append("train.diffaug: image augmentation does not apply to 2-D points")
    if t.loss == "wasserstein" and t.gp_lambda == 0 and m.spectral_norm in ("none", "g"):
        p.append("train.gp_lambda: a Wasserstein critic needs a Lipschitz constraint "
                 "(gp_lambda > 0 or model.spectral_norm: d)")
    if (t.gp_lambda > 0 or t.loss == "wasserstein") and m.kind == "dcgan" and m.d_batchnorm:
        p.append("model.d_batchnorm: the gradient penalty and a Wasserstein critic need a "
                 "discriminator without BatchNorm (set model.d_batchnorm: false)")
    if spec.storage.keep_best_by and spec.storage.keep_best_by not in METRIC_MODES:
        p.append(f"storage.keep_best_by: expected one of {', '.join(METRIC_MODES)}, "
                 f"got {spec.storage.keep_best_by!r}")
    if spec.storage.keep_best_by in EVAL_RESULTS:
        if not spec.eval.every:
            p.append("storage.keep_best_by: ranking by an evaluation metric needs eval.every")
        elif spec.storage.checkpoint_every % spec.eval.every:
            p.append(f"storage.checkpoint_every: {spec.storage.checkpoint_every} must be a multiple of "
                     f"eval.every={spec.eval.every} so every checkpoint carries {spec.storage.keep_best_by}")
        name = {"precision": "pr", "recall": "pr"}.get(spec.storage.keep_best_by, spec.storage.keep_best_by)
        if spec.eval.every and name not in spec.eval.metrics:
            p.append(f"storage.keep_best_by: {spec.storage.keep_best_by} is not in eval.metrics")
    for key, value in (("data.path", d.path), ("data.endpoint_url", d.endpoint_url),
                       ("storage.path", spec.storage.path), ("storage.endpoint_url", spec.storage.endpoint_url),
                       ("eval.extractor", spec.eval.extractor), ("eval.inception_path", spec.eval.inception_path)):
        if value and URL_CREDENTIALS.match(value):
            p.append(f"{key}: the URL carries credentials (user:password@); remove them and let the "
                     f"environment, a profile or an instance role supply them")
    e = spec.eval
    if e.every and not spec.is_gan and m.kind != "vae":
        p.append("eval.every: evaluation applies to generative models")
    if e.every and e.features in ("classifier", "torchscript") and not e.extractor:
        p.append(f"eval.extractor: required for eval.features '{e.features}'")
    if e.every and "is" in e.metrics and e.features not in FEATURES_WITH_LOGITS:
        p.append(IS_NEEDS_LOGITS.format(features=e.features))
    if e.every:  # a stored spec may carry metrics it never evaluates: checked when they run
        p += metric_problems(spec)
    if m.pack > 1:
        if not spec.is_gan:
            p.append(f"model.pack: packing applies to GAN discriminators, not {m.kind}")
        if m.conditional:
            p.append("model.pack: a conditional discriminator takes one label per sample; packing needs model.conditional: false")
        odd = [n for n in range(lo, hi + 1) if n and (t.batch_size // n) % m.pack]
        if odd:
            p.append(f"model.pack: each worker's batch ({t.batch_size} / {odd[0]} workers = "
                     f"{t.batch_size // odd[0]}) must divide into packs of {m.pack}")
    if m.latent_components and m.kind != "mlp_gan":
        p.append(f"model.latent_components: a mixture latent prior is built for mlp_gan, not {m.kind}")
    if m.fourier_features and not (m.kind == "mlp_gan" and spec.data.source == "gaussian_mixture"):
        p.append("model.fourier_features: built for mlp_gan on gaussian_mixture points")
    if m.latent_components == 1:
        p.append("model.latent_components: 1 component is the plain Gaussian prior; use 0, or 2 and more")
    if any(v < 1 for v in m.hidden):
        p.append("model.hidden: layer sizes must be positive")
    return p


def metric_problems(spec: JobSpec) -> list[str]:
    """eval.metrics that cannot score this job's samples: mode metrics need 2-D mixture points,
    image metrics need images."""
    points = spec.data.source == "gaussian_mixture"
    wrong = [n for n in spec.eval.metrics if n in (IMAGE_METRICS if points else MODE_METRICS)]
    if not wrong:
        return []
    if points:
        return [f"eval.metrics: {', '.join(wrong)} score images; a gaussian_mixture job's 2-D points "
                f"take {', '.join(MODE_METRICS)}"]
    return [f"eval.metrics: {', '.join(wrong)} score 2-D gaussian_mixture points; {spec.data.source} "
            f"images take {', '.join(IMAGE_METRICS)}"]
