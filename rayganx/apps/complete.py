"""`rayganx complete`: fill a hole in each image of a dataset from a trained generator.

The per-batch computation is `rayganx.apps.inpaint`; here are the job (input, masks, output), the
checks made before anything is written, and `run`, which maps `inpaint.complete_batch` over a
folder or Parquet input with Ray Data actors that load the model once each.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from rayganx.apps.inpaint import (BLENDS, CONTEXTS, METHODS, Mask, Model, Search, complete_batch, image_seed,
    load_model, parse_mask, read_hole, synthetic_hole)
from rayganx.job.spec import SpecError
from rayganx.store.storage import Store, contained, relative_key

MANIFEST = "complete.json"
GRID = "grid.png"
PREVIEW = 16  # images in grid.png


# --------------------------------------------------------------------------- over a dataset


@dataclass
class Job:
    """One `rayganx complete`: what to read, how to fill, where to write."""

    checkpoint: str
    input_url: str
    mask: Mask
    out_url: str
    method: str = "model"
    search: Search = field(default_factory=Search)
    blend: str = "poisson"
    seed: int = 0
    batch_size: int = 64
    endpoint_url: str | None = None
    # planned: the images (keys and where they are), in chunks of batch_size
    size: int = 0
    channels: int = 1
    parquet: bool = False
    items: list = field(default_factory=list)  # [(key, path, row)]: row None for image files
    masks: dict = field(default_factory=dict)  # key -> mask path (a mask folder)

    def settings(self) -> dict:
        return {"format": "rayganx-complete/1", "checkpoint": self.checkpoint, "input": self.input_url,
                "mask": self.mask.url or (f"box:{','.join(map(str, self.mask.box))}" if self.mask.box else
                                          self.mask.kind + (f":{self.mask.fraction:g}" if self.mask.kind == "random"
                                                            else "")),
                "method": self.method, "blend": self.blend, "seed": self.seed,
                "search": asdict(self.search) if self.method == "model" else None}

    @property
    def chunks(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def chunk(self, i: int) -> list:
        return self.items[i * self.batch_size:(i + 1) * self.batch_size]


def _images_under(store: Store) -> list[str]:
    from rayganx.data.sources import IMAGE_EXTENSIONS

    store.fs.invalidate_cache(store.root)  # listed afresh: the folder may have changed in this process
    return sorted(f for f in store.fs.find(store.root) if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)


def _list_input(job: Job) -> None:
    store = Store(job.input_url, job.endpoint_url)
    if not store.exists():
        raise SpecError(f"--input {job.input_url}: does not exist")
    files = [store.root] if store.fs.isfile(store.root) else sorted(store.fs.find(store.root))
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet:
        import pyarrow.parquet as pq

        job.parquet = True
        for f in parquet:
            with store.fs.open(f, "rb") as fh:
                rows = pq.ParquetFile(fh).metadata.num_rows
            key = posixpath.basename(f) if f == store.root else relative_key(f, store.root)
            stem = posixpath.splitext(contained(key, f"--input {job.input_url}"))[0]
            job.items += [(f"{stem}-{r:06d}", f, r) for r in range(rows)]
    else:
        images = _images_under(store)
        # Output names come from input keys: each is checked to stay inside --out before anything runs.
        job.items = [(posixpath.splitext(contained(relative_key(f, store.root), f"--input {job.input_url}"))[0], f, None)
                     for f in images]
    if not job.items:
        raise SpecError(f"--input {job.input_url}: no images (png, jpg, ...) or Parquet rows there")


def _match_masks(job: Job) -> None:
    """A mask folder holds one mask per input image, same relative name; every one is read and
    checked now, so a bad one stops the run before anything is written."""
    store = Store(job.mask.url, job.endpoint_url)
    found = {posixpath.splitext(contained(relative_key(f, store.root), f"--mask {job.mask.url}"))[0]: f
             for f in _images_under(store)}
    if len(found) != len(job.items):
        raise SpecError(f"--mask {job.mask.url}: {len(found)} mask images for {len(job.items)} input images")
    for key, _, _ in job.items:
        if key not in found:
            raise SpecError(f"--mask {job.mask.url}: no mask for {key} (masks pair with images by name)")
        with store.fs.open(found[key], "rb") as fh:
            read_hole(fh.read(), job.size, found[key])
    job.masks = found


def prepare(job: Job) -> Job:
    """Check everything that can be checked before Ray starts or anything is written."""
    if job.method not in METHODS:
        raise SpecError(f"--method {job.method!r}: expected one of {', '.join(METHODS)}")
    if job.blend not in BLENDS:
        raise SpecError(f"--blend {job.blend!r}: expected one of {', '.join(BLENDS)}")
    if job.search.steps < 1 or job.search.restarts < 1 or job.batch_size < 1:
        raise SpecError("--steps, --restarts and --batch-size must be at least 1")
    if job.method == "model" and job.search.context not in CONTEXTS:
        raise SpecError(f"--context {job.search.context!r}: expected one of {', '.join(CONTEXTS)}")
    if job.method == "model" and not job.search.prior >= 0:  # NaN too
        raise SpecError(f"--prior {job.search.prior}: the prior's weight must be 0 or more")
    model = load_model(job.checkpoint, job.endpoint_url)
    spec = model.spec
    if spec.data.source == "gaussian_mixture":
        raise SpecError(f"{job.checkpoint}: a 2-D point model has no images to complete")
    job.size, job.channels = spec.data.image_size, spec.data.channels
    if job.mask.kind == "box":  # parsed against the size given then; check against the model's
        parse_mask(f"box:{','.join(map(str, job.mask.box))}", job.size)
    _list_input(job)
    if job.mask.kind == "dir":
        _match_masks(job)
    out = Store(job.out_url, job.endpoint_url)
    if out.exists(MANIFEST):
        there = json.loads(out.read_text(MANIFEST)).get("settings", {})
        if there != job.settings():
            diff = ", ".join(f"{k} {there.get(k)!r} there, {v!r} now" for k, v in job.settings().items()
                             if there.get(k) != v)
            raise SpecError(f"{out.url} holds another completion ({diff}); choose another --out")
    return job


def reference_images(job: Job) -> np.ndarray:
    """The checkpoint's training images (its data source, the validation fraction held out), as
    uint8 NCHW: what `nearest` searches. Needs Ray (the data pipeline)."""
    from rayganx.data import sources as rdata

    spec = load_model(job.checkpoint, job.endpoint_url).spec
    if spec.data.source == "digits" or spec.data.path:
        batches = list(rdata.build(spec.data, "train").iter_batches(batch_format="numpy", batch_size=4096))
        images = [b["image"] for b in batches if len(b["image"])]
        if images:
            return np.concatenate(images)
    raise SpecError(f"--method nearest: the training data of {job.checkpoint} ({spec.data.source}"
                    f"{' at ' + spec.data.path if spec.data.path else ''}) has no images to search")


def _load_images(job: Job, items: list, store: Store) -> torch.Tensor:
    """uint8 (N, C, size, size), brought to the model's size the way training data is."""
    import io

    from PIL import Image

    from rayganx.data.sources import to_array

    tables: dict = {}
    out = []
    for key, path, row in items:
        if row is None:
            with store.fs.open(path, "rb") as fh:
                data = fh.read()
        else:
            if path not in tables:
                import pyarrow.parquet as pq

                with store.fs.open(path, "rb") as fh:
                    tables[path] = pq.read_table(fh, columns=["image"]).column(0)
            data = tables[path][row].as_py()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            out.append(to_array(img, job.size, job.channels, None))
    return torch.from_numpy(np.stack(out))


def complete_chunk(job: Job, i: int, model: Model | None, reference: torch.Tensor | None) -> dict:
    """Complete and write chunk i; returns its count, hole error (against the input's own pixels,
    when the mask was made here) and, for chunk 0, the preview grid's rows."""
    from rayganx.data.sources import model_input
    from rayganx.models.images import png_bytes, to_uint8

    items = job.chunk(i)
    src, out = Store(job.input_url, job.endpoint_url), Store(job.out_url, job.endpoint_url)
    original = _load_images(job, items, src)
    if job.mask.kind == "dir":
        mstore = Store(job.mask.url, job.endpoint_url)
        holes = []
        for key, _, _ in items:
            with mstore.fs.open(job.masks[key], "rb") as fh:
                holes.append(read_hole(fh.read(), job.size, job.masks[key]))
    else:
        holes = [synthetic_hole(job.mask, job.size, job.seed, key) for key, _, _ in items]
    hole = torch.from_numpy(np.stack(holes))
    x = model_input(original)
    seeds = [image_seed(job.seed, key) for key, _, _ in items]
    done, labels = complete_batch(x, hole, job.method, model=model, reference=reference, seeds=seeds,
                                  search=job.search, how=job.blend)
    u8 = to_uint8(done)
    for (key, _, _), im in zip(items, u8):
        out.write_bytes(png_bytes(im), key + ".png")
    h = hole.expand_as(original).numpy().astype(bool)
    sq = float(((u8.astype(np.float64) - original.numpy()) ** 2)[h].sum())
    preview = b""
    if i == 0:
        from rayganx.models.images import grid_png

        k = min(PREVIEW, len(items))
        shown = x[:k] * (1 - hole[:k])  # the hole shows mid grey
        cols = [shown, done[:k]] + ([x[:k]] if job.mask.kind != "dir" else [])
        preview = grid_png(torch.stack(cols, 1).flatten(0, 1), len(cols))
    return {"n": len(items), "sq_err": sq, "hole_px": int(h.sum()), "preview": preview}


class _Completer:
    """A Ray Data actor: loads the model (or the reference images) once, then completes chunks."""

    def __init__(self, job: Job, reference, threads: int):
        torch.set_num_threads(threads)
        self.job = job
        self.model = load_model(job.checkpoint, job.endpoint_url) if job.method == "model" else None
        self.reference = None if reference is None else torch.from_numpy(reference).float().div(127.5).sub(1)

    def __call__(self, batch: dict) -> dict:
        rows = [complete_chunk(self.job, int(c), self.model, self.reference) for c in batch["chunk"]]
        return {"chunk": batch["chunk"], "n": np.asarray([r["n"] for r in rows]),
                "sq_err": np.asarray([r["sq_err"] for r in rows]), "hole_px": np.asarray([r["hole_px"] for r in rows]),
                "preview": np.asarray([r["preview"] for r in rows], dtype=object)}


def run(job: Job, workers: int = 2, threads: int = 1, use_gpu: bool = False,
        on_chunk: Callable[[int, int], None] | None = None) -> dict:
    """Complete every image of a prepared job with `workers` Ray Data actors; returns the summary
    (also written to complete.json beside the images)."""
    import math

    import ray

    out = Store(job.out_url, job.endpoint_url)
    reference = reference_images(job) if job.method == "nearest" else None
    out.write_text(json.dumps({"settings": job.settings()}, indent=2), MANIFEST)
    ds = ray.data.from_items([{"chunk": i} for i in range(job.chunks)], override_num_blocks=job.chunks)
    done = ds.map_batches(_Completer, fn_constructor_args=(job, reference, threads), batch_size=1,
                          compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, job.chunks))),
                          num_cpus=threads, num_gpus=1 if use_gpu else 0)
    n, sq, px, preview = 0, 0.0, 0, b""
    for row in done.iter_rows():
        n, sq, px = n + int(row["n"]), sq + float(row["sq_err"]), px + int(row["hole_px"])
        preview = row["preview"] or preview
        if on_chunk:
            on_chunk(n, len(job.items))
    out.write_bytes(preview, GRID)
    summary = {"images": n, "out": out.url}
    if job.mask.kind != "dir" and px:  # the input was whole: its hole pixels are the truth
        mse = sq / px
        summary["hole_psnr_db"] = round(10 * math.log10(255 ** 2 / mse), 3) if mse else float("inf")
    out.write_text(json.dumps({"settings": job.settings(), "summary": summary}, indent=2), MANIFEST)
    return summary
