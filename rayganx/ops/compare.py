"""Runs side by side: their specs (what differs), latest and best metrics, curves and sample grids.

Everything is read from the run store (spec.yaml, the metrics log, samples/, checkpoints), local
or object storage; nothing needs Ray.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field

import yaml

from rayganx.job.metric_names import EVAL_RESULTS, METRIC_MODES
from rayganx.job.spec import JobSpec
from rayganx.store.runs import list_checkpoints, read_metrics
from rayganx.store.storage import Store, StorageError

FIGSIZE, DPI = (12, 8), 100  # the PNG is 1200 x 800 pixels
SUMMARY = ("loss_d", "loss_g", "loss", "images_per_s", "step_time", "fid", "kid", "is", "precision", "recall",
           "val_accuracy", "elbo")
EVAL = EVAL_RESULTS
QUALITY = ("fid", "kid", "val_accuracy", "elbo")  # the third panel: the first one any run has


@dataclass
class RunView:
    url: str
    spec: dict
    rows: list = field(default_factory=list)        # metrics rows, superseded ones dropped
    events: list = field(default_factory=list)      # rollbacks, resumes
    checkpoints: list = field(default_factory=list)
    sample: tuple[str, bytes] | None = None         # the newest sample grid: (name, PNG)
    label: str = ""

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    def latest(self, key: str):
        steps, values = self.series(key)
        return (values[-1], steps[-1]) if values else None

    def best(self, key: str):
        if key not in METRIC_MODES:
            return None
        pts = list(zip(*self.series(key)))
        if not pts:
            return None
        step, value = (min if METRIC_MODES[key] == "min" else max)(pts, key=lambda p: p[1])
        return value, step


def load_run(run: Store) -> RunView:
    if not run.exists("spec.yaml"):
        raise StorageError(f"{run.url}: not a rayganx run (no spec.yaml)")
    spec = yaml.safe_load(run.read_text("spec.yaml")) or {}
    rows = read_metrics(run)
    view = RunView(url=run.url, spec=spec, rows=[r for r in rows if "event" not in r],
                   events=[r for r in rows if "event" in r], checkpoints=list_checkpoints(run))
    grids = sorted(posixpath.basename(f["name"]) for f in run.listdir("samples") if f["name"].endswith(".png"))
    if grids:
        view.sample = (grids[-1], run.read_bytes("samples", grids[-1]))
    return view


def expand(urls: list[str], endpoint_url: str | None) -> list[Store]:
    """Runs named on the command line; a sweep's folder stands for its trials."""
    from rayganx.store.tracking import find_runs

    runs = []
    for url in urls:
        store = Store(url, endpoint_url)
        found = find_runs(store)
        if not found:
            raise StorageError(f"{url}: no rayganx run there (no spec.yaml, and no trial folders with one)")
        runs += found
    return runs


def load_runs(stores: list[Store]) -> list[RunView]:
    views = [load_run(s) for s in stores]
    names = [v.name for v in views]
    for v in views:  # the same name in two stores: the URL tells them apart
        v.label = v.name if names.count(v.name) == 1 else v.url
    return views


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def spec_diff(views: list[RunView]) -> list[tuple[str, list]]:
    """The spec keys whose values differ between the runs (the run name excepted)."""
    flat = [flatten(v.spec) for v in views]
    keys = sorted(set().union(*flat) - {"name"})
    return [(k, [f.get(k) for f in flat]) for k in keys if len({repr(f.get(k)) for f in flat}) > 1]


def non_default(view: RunView) -> list[tuple[str, object]]:
    """The spec keys a run sets to something other than rayganx's default."""
    defaults = flatten(JobSpec.model_validate({"name": view.spec.get("name", "x")}).to_dict())
    return [(k, v) for k, v in sorted(flatten(view.spec).items()) if k != "name" and defaults.get(k, object()) != v]


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def metric_cell(view: RunView, key: str) -> str:
    latest, best = view.latest(key), view.best(key)
    if latest is None:
        return "-"
    text = fmt(latest[0])
    if best is not None:
        text += f" (best {fmt(best[0])} @ {best[1]})"
    return text


def summary_keys(views: list[RunView]) -> list[str]:
    return [k for k in SUMMARY if any(v.latest(k) for v in views)]


# --------------------------------------------------------------------------- the figure


def figure(views: list[RunView], out: str | None = None) -> bytes:
    """Curves on shared axes (loss, images/s, FID or the model's quality metric where present)
    over the runs' last sample grids; a 1200 x 800 PNG. Returned, and written to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    quality = next((k for k in QUALITY if any(v.latest(k) for v in views)), None)
    panels = [("loss", ("loss_d", "loss_g", "loss")), ("images/s", ("images_per_s",))]
    if quality:
        panels.append((quality.upper() if quality in EVAL else quality, (quality,)))
    fig = plt.figure(figsize=FIGSIZE, dpi=DPI)
    gs = fig.add_gridspec(2, 1, height_ratios=[1, 1.1], hspace=0.25, left=0.05, right=0.98, top=0.95, bottom=0.02)
    top = gs[0].subgridspec(1, len(panels), wspace=0.25)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"loss_d": "-", "loss_g": "--", "loss": "-"}
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(top[i])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        for j, v in enumerate(views):
            for k in keys:
                steps, values = v.series(k)
                if steps:
                    suffix = f" {k}" if len(keys) > 1 else ""
                    ax.plot(steps, values, styles.get(k, "-"), color=colors[j % len(colors)],
                            marker="o" if len(steps) < 20 else None, markersize=3, label=f"{v.label}{suffix}")
        if ax.lines:
            ax.legend(fontsize=7)
    bottom = gs[1].subgridspec(1, max(1, len(views)), wspace=0.1)
    for j, v in enumerate(views):
        ax = fig.add_subplot(bottom[j])
        ax.axis("off")
        if v.sample:
            im = Image.open(io.BytesIO(v.sample[1]))
            ax.imshow(im, cmap="gray", vmin=0, vmax=255) if im.mode == "L" else ax.imshow(im.convert("RGB"))
            step = v.sample[0].removeprefix("step_").removesuffix(".png").lstrip("0") or "0"
            ax.set_title(f"{v.label} @ step {step}", fontsize=9, color=colors[j % len(colors)])
        else:
            ax.set_title(f"{v.label}: no sample grid", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    data = buf.getvalue()
    if out:
        with open(out, "wb") as f:
            f.write(data)
    return data
