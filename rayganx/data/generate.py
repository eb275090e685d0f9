"""Distributed generation: a trained generator writes N labelled images as Parquet parts.

Image i is drawn from its own seed (`seed * 2**32 + i`), so any part can be regenerated alone and
the set does not depend on how many workers made it. Parts are written whole (one object per
part, local files renamed into place), so a part that exists is complete and a re-run only makes
the missing ones. `_rayganx_generate.json` beside the parts records what they were made from; a re-run
with different settings into the same place is refused instead of mixing two sets.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rayganx.job.spec import SpecError
from rayganx.store.storage import Store

MANIFEST = "_rayganx_generate.json"  # a leading underscore: Parquet readers (pandas, Spark, DuckDB) skip it
PART = re.compile(r"part-(\d{6})\.parquet$")


@dataclass(frozen=True)
class Plan:
    """What a generation writes: n images from checkpoint, in parts of part_size rows."""

    checkpoint: str
    n: int
    seed: int = 0
    labels: tuple[int, ...] | None = None  # the class of image i is labels[i % len(labels)]
    part_size: int = 1000

    @property
    def parts(self) -> int:
        return math.ceil(self.n / self.part_size)

    def rows(self, part: int) -> range:
        return range(part * self.part_size, min(self.n, (part + 1) * self.part_size))

    def manifest(self) -> dict:
        return {"format": "rayganx-generate/1", "checkpoint": self.checkpoint, "n": self.n, "seed": self.seed,
                "labels": list(self.labels) if self.labels is not None else None, "part_size": self.part_size}


def load(checkpoint: str, endpoint_url: str | None):
    from rayganx.models.trained import open_generator

    return open_generator(checkpoint, endpoint_url)


def check(plan: Plan, spec, num_classes: int | None) -> None:
    """Refuse a plan the generator cannot make, before any work."""
    if plan.n < 1 or plan.part_size < 1:
        raise SpecError("--n and --part-size must be at least 1")
    conditional = bool(spec.model.conditional and num_classes)
    if plan.labels is not None and not conditional:
        raise SpecError(f"--labels: {plan.checkpoint} is not a conditional generator")
    for y in plan.labels or ():
        if not 0 <= y < num_classes:
            raise SpecError(f"--labels: {y} is not a class of this generator (0..{num_classes - 1})")


def labels_for(plan: Plan, rows: range, num_classes: int | None) -> np.ndarray | None:
    classes = plan.labels if plan.labels is not None else (tuple(range(num_classes)) if num_classes else None)
    if not classes:
        return None
    return np.asarray([classes[i % len(classes)] for i in rows], dtype=np.int64)


@torch.no_grad()
def make_images(g, spec, plan: Plan, rows: range, num_classes: int | None, device: str = "cpu"):
    """Images `rows` of a plan as uint8 NCHW, their labels (-1 when unconditional) and seeds.
    data.synthetic makes its rows with this too, so they are the images `rayganx generate` writes."""
    from rayganx.models.images import to_uint8
    from rayganx.models.networks import generate

    seeds = np.asarray([plan.seed * 2 ** 32 + i for i in rows], dtype=np.int64)
    z = torch.stack([torch.randn(spec.model.latent_dim, generator=torch.Generator().manual_seed(int(s)))
                     for s in seeds])
    y = labels_for(plan, rows, num_classes) if spec.model.conditional else None
    images = []
    for k in range(0, len(rows), 256):
        yb = torch.from_numpy(y[k:k + 256]).to(device) if y is not None else None
        images.append(to_uint8(generate(g, z[k:k + 256].to(device), yb)))
    label = y if y is not None else np.full(len(rows), -1, dtype=np.int64)
    return np.concatenate(images), label, seeds


def make_part(g, spec, plan: Plan, part: int, num_classes: int | None, device: str = "cpu") -> bytes:
    """One part's Parquet bytes: columns image (PNG), label (-1 when unconditional), seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayganx.models.images import png_bytes

    images, label, seeds = make_images(g, spec, plan, plan.rows(part), num_classes, device)
    pngs = [png_bytes(im) for im in images]
    table = pa.table({"image": pa.array(pngs, pa.binary()), "label": label, "seed": seeds})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def part_name(part: int) -> str:
    return f"part-{part:06d}.parquet"


def done_parts(out: Store) -> set[int]:
    return {int(m.group(1)) for f in out.listdir() if (m := PART.search(f["name"]))}


def claim(out: Store, plan: Plan) -> None:
    """Write the manifest, or check that the one there describes this same generation."""
    if out.exists(MANIFEST):
        there = json.loads(out.read_text(MANIFEST))
        if there != plan.manifest():
            diff = ", ".join(f"{k} {there.get(k)!r} there, {v!r} now" for k, v in plan.manifest().items()
                             if there.get(k) != v)
            raise SpecError(f"{out.url} holds another generation ({diff}); choose another --out")
        return
    out.write_text(json.dumps(plan.manifest(), indent=2), MANIFEST)


class _Writer:
    """A Ray Data actor: loads the generator once, then writes each part it is handed."""

    def __init__(self, plan: Plan, out_url: str, endpoint_url: str | None, use_gpu: bool):
        self.plan, self.out = plan, Store(out_url, endpoint_url)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        g, self.spec, self.num_classes = load(plan.checkpoint, endpoint_url)
        self.g = g.to(self.device)

    def __call__(self, batch: dict) -> dict:
        for part in batch["part"]:
            data = make_part(self.g, self.spec, self.plan, int(part), self.num_classes, self.device)
            self.out.write_bytes(data, part_name(int(part)))
        return {"part": batch["part"], "rows": np.asarray([len(self.plan.rows(int(p))) for p in batch["part"]])}


def prepare(plan: Plan, out_url: str, endpoint_url: str | None = None) -> list[int]:
    """Check the plan against its generator and claim out_url (no Ray needed); returns the parts
    still to write."""
    _, spec, num_classes = load(plan.checkpoint, endpoint_url)
    check(plan, spec, num_classes)
    out = Store(out_url, endpoint_url)
    claim(out, plan)
    return sorted(set(range(plan.parts)) - done_parts(out))


def run(plan: Plan, todo: list[int], out_url: str, endpoint_url: str | None = None, workers: int = 2,
        use_gpu: bool = False, on_part: Callable[[int, int], None] | None = None) -> dict:
    """Write the parts in todo (from `prepare`) with `workers` Ray Data actors; returns a summary.
    on_part(images_done, images_total) hears progress."""
    import ray

    done_rows = plan.n - sum(len(plan.rows(p)) for p in todo)
    if on_part:
        on_part(done_rows, plan.n)
    if todo:
        ds = ray.data.from_items([{"part": p} for p in todo], override_num_blocks=len(todo))
        written = ds.map_batches(
            _Writer, fn_constructor_args=(plan, out_url, endpoint_url, use_gpu), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(todo)))),
            num_gpus=1 if use_gpu else 0, num_cpus=1)
        for row in written.iter_rows():
            done_rows += int(row["rows"])
            if on_part:
                on_part(done_rows, plan.n)
    return {"out": Store(out_url, endpoint_url).url, "images": plan.n, "parts": plan.parts, "written": len(todo),
            "skipped": plan.parts - len(todo)}
