"""Generated labelled images as classifier training data (`data.synthetic`).

The rows come from a class-conditional generator (a checkpoint folder or an exported .pt), made
by Ray Data tasks before training reads them, or from a folder that `rayganx generate` wrote.
Either way they are `rayganx generate` images: image i from seed `S * 2**32 + i`, of class
`i mod classes`. A generator makes the first N with S = train.seed; a generate folder gives its
first N (its own seed). N is what makes them `fraction` of the training rows:
N = real rows x fraction / (1 - fraction). They join the real training rows before the per-epoch
shuffle, so each batch holds about that share; every row carries `synthetic` (1 or 0), which
the training loop counts (the `synthetic_share` metric). Validation stays real.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np

from rayganx.data import sources as rdata
from rayganx.job.spec import JobSpec, SpecError
from rayganx.store.pyarrow_fs import pyarrow_filesystem
from rayganx.store.storage import Store, StorageError

KEY = "data.synthetic.generator"


@dataclass(frozen=True)
class Source:
    """A checked data.synthetic: where the generated rows come from and how many the job takes."""

    url: str
    kind: str  # "generator" (made here) or "generated" (a `rayganx generate` folder)
    rows: int
    seed: int
    part_size: int = 0  # generated folders: rows per part


def rows_for(fraction: float, real_rows: int) -> int:
    """Generated rows that make `fraction` of a training set with `real_rows` real ones."""
    return max(1, round(real_rows * fraction / (1.0 - fraction)))


def _refuse(msg: str) -> SpecError:
    return SpecError(f"{KEY}: {msg}")


def check(spec: JobSpec, real_rows: int, num_classes: int) -> Source:
    """Refuse, before Ray starts, a source the job cannot train on: missing, unreadable,
    unconditional, or made for other classes, image sizes or channels. One line each."""
    from rayganx.data import generate

    syn, d = spec.data.synthetic, spec.data
    url, rows = syn.generator, rows_for(syn.fraction, real_rows)
    try:
        store = Store(url, d.endpoint_url)
        if not store.exists():
            raise _refuse(f"{url} does not exist")
        if store.exists(generate.MANIFEST):
            return _check_generated(spec, store, rows, num_classes)
        g, gspec, classes = _load(url, d.endpoint_url)
    except SpecError:
        raise
    except StorageError as e:
        raise _refuse(str(e).splitlines()[0]) from None
    except Exception as e:  # a file that is not a generator at all
        raise _refuse(f"cannot load {url}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if not (gspec.model.conditional and classes):
        raise _refuse(f"{url} is an unconditional generator (model.conditional: false): labelled training "
                      f"images need a class-conditional one")
    _same_images(url, (gspec.data.image_size, gspec.data.channels), d)
    if classes != num_classes:
        raise _refuse(f"{url} makes {classes} classes, this job's data has {num_classes}")
    return Source(url, "generator", rows, spec.train.seed)


def _same_images(url: str, got: tuple[int, int], d) -> None:
    size, channels = got
    if size != d.image_size or channels != d.channels:
        raise _refuse(f"{url} makes {size} px images with {channels} channel(s), this job trains on "
                      f"{d.image_size} px with {d.channels} (data.image_size, data.channels)")


def _check_generated(spec: JobSpec, store: Store, rows: int, num_classes: int) -> Source:
    """A `rayganx generate` folder: its manifest, and its first part's first image and labels."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from rayganx.data import generate

    url, d = store.url, spec.data
    manifest = json.loads(store.read_text(generate.MANIFEST))
    if manifest.get("format") != "rayganx-generate/1":
        raise _refuse(f"{url}/{generate.MANIFEST} is not a rayganx generate manifest")
    n, part_size = int(manifest["n"]), int(manifest["part_size"])
    first = generate.part_name(0)
    if store.exists(first):  # what the images are before how many: the more basic mistake first
        with store.fs.open(store.path(first), "rb") as f:
            table = pq.read_table(f, columns=["image", "label"])
        labels = table.column("label").to_numpy()
        if (labels < 0).any():
            raise _refuse(f"{url} was made by an unconditional generator (label -1): labelled training images "
                          f"need a class-conditional one")
        top = max([int(labels.max()), *(manifest.get("labels") or [])])
        if top >= num_classes:
            raise _refuse(f"{url} holds class {top}, this job's data has {num_classes} classes "
                          f"(0..{num_classes - 1})")
        with Image.open(io.BytesIO(table.column("image")[0].as_py())) as im:
            size, channels = im.size[0], len(im.getbands())
        _same_images(url, (size, channels), d)
    parts = math.ceil(rows / part_size)
    missing = [generate.part_name(p) for p in range(parts) if not store.exists(generate.part_name(p))]
    if rows > n or missing:
        have = f"holds {n} images" if rows > n else f"lacks {missing[0]} (a generation still running?)"
        raise _refuse(f"{url} {have}; data.synthetic.fraction={spec.data.synthetic.fraction} of this job's "
                      f"training data needs its first {rows} (rayganx generate ... --n {max(n, rows)})")
    return Source(url, "generated", rows, int(manifest["seed"]), part_size)


# --------------------------------------------------------------------------- the rows


@functools.lru_cache(maxsize=2)
def _load(url: str, endpoint_url: str | None):
    """The generator, once per process (a Ray Data task's worker makes many batches)."""
    from rayganx.models.trained import open_generator

    return open_generator(url, endpoint_url)


def _make(batch: dict, *, url: str, endpoint_url: str | None, seed: int, n: int) -> dict:
    from rayganx.data import generate

    g, gspec, classes = _load(url, endpoint_url)
    plan = generate.Plan(url, n, seed)
    images, labels, _ = generate.make_images(g, gspec, plan, [int(i) for i in batch["id"]], classes)
    return {"image": images, "label": labels, "synthetic": np.ones(len(labels), np.uint8)}


def _decode(batch: dict, *, n: int, decode: dict) -> dict:
    keep = (np.asarray(batch["seed"]) % 2 ** 32) < n  # image i has seed S * 2**32 + i: the first n
    out = rdata.decode_rows({k: np.asarray(v)[keep] for k, v in batch.items()}, **decode)
    return out | {"synthetic": np.ones(len(out["label"]), np.uint8)}


def dataset(spec: JobSpec, src: Source):
    """The generated rows: {"image": uint8 CxHxW, "label", "synthetic": 1}, in a fixed order."""
    import ray

    d = spec.data
    if src.kind == "generator":
        return ray.data.range(src.rows, override_num_blocks=max(1, min(8, src.rows // 256))).map_batches(
            _make, fn_kwargs=dict(url=src.url, endpoint_url=d.endpoint_url, seed=src.seed, n=src.rows),
            batch_size=256, batch_format="numpy")
    from rayganx.data import generate

    store = Store(src.url, d.endpoint_url)
    files = [store.path(generate.part_name(p)) for p in range(math.ceil(src.rows / src.part_size))]
    decode = dict(size=d.image_size, channels=d.channels, crop=None, on_corrupt="fail", split="all", val_fraction=0.0,
                  image_col="image", label_col="label")
    ds = ray.data.read_parquet(files, filesystem=pyarrow_filesystem(store.url, store.endpoint_url)
                               ).select_columns(["image", "label", "seed"])
    return ds.map_batches(functools.partial(_decode, n=src.rows, decode=decode), batch_format="numpy")


def _real(batch: dict) -> dict:
    return dict(batch) | {"synthetic": np.zeros(len(batch["label"]), np.uint8)}


def mixed(real, generated):
    """Real rows (marked synthetic=0) and generated ones (1) as one dataset."""
    return real.map_batches(_real, batch_format="numpy").union(generated)
