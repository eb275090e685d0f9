"""The metrics by name: which a run can be ranked by and in which direction, what each evaluation
metric scores and reports. Spec checks, sweeps, comparisons and the metrics themselves read them here."""

from __future__ import annotations

# Metric names a run can be ranked by; "min" metrics are better when lower.
METRIC_MODES = {"fid": "min", "kid": "min", "is": "max", "precision": "max", "recall": "max",
                "modes": "max", "hq": "max", "kl": "min",
                "cas": "max", "val_accuracy": "max", "loss_g": "min", "loss_d": "min", "elbo": "max"}
# Evaluation metrics by name: what each scores (images, through a feature extractor, or the 2-D
# points of a gaussian_mixture job, by the mode-collapse papers' protocol) and the values it
# reports. evaluation/metrics.py computes them under these names; checks, sweeps and comparisons read them here.
EVAL_METRICS = {"fid": ("images", ("fid",)), "kid": ("images", ("kid",)), "is": ("images", ("is",)),
                "pr": ("images", ("precision", "recall")),
                "modes": ("points", ("modes",)), "hq": ("points", ("hq",)), "kl": ("points", ("kl",)),
                # The high-quality samples' spread about their modes over the data's own (1: as wide
                # as the data); not a ranking metric: below 1 is precision bought by shrinking.
                "width": ("points", ("width",)),
                # Classification Accuracy Score: a classifier trained on conditional samples, and its
                # reference trained on the real images (no feature extractor).
                "cas": ("images", ("cas", "cas_real"))}
IMAGE_METRICS = tuple(k for k, (scores, _) in EVAL_METRICS.items() if scores == "images")
MODE_METRICS = tuple(k for k, (scores, _) in EVAL_METRICS.items() if scores == "points")
EVAL_RESULTS = tuple(r for _, results in EVAL_METRICS.values() for r in results)


def metric_reporting(result: str, points: bool) -> str | None:
    """The evaluation metric that reports `result` for a job of images or of points (precision:
    pr), or None when no evaluation metric does (a training metric such as loss_g)."""
    kind = "points" if points else "images"
    return next((k for k, (scores, results) in EVAL_METRICS.items() if scores == kind and result in results), None)
