"""The rows a training run reads, each with an id, and each worker's reader over them.

The driver turns a job's data into a row source once (`source`): rows with ids 0..n-1 in the
dataset's own order (path order, Parquet row order). The workers read them in the order of
`rayganx.data.order`, a pure function of (train.seed, epoch), each its slice of every global batch,
from any `Position`: a resumed or resized run reads on from the exact row where its checkpoint
was taken. Three sources:

- `Table`: rows in Ray's object store. Decoded uint8 images (digits, and any dataset whose decoded
  images take at most a quarter of the object store: `data.cache`) are gathered by id in the
  worker itself, with no per-batch task. Encoded Parquet rows too large to keep decoded are
  decoded as they are read.
- `Files`: an image folder too large to keep decoded, read and decoded as it is read.
- `Points`: a 2-D Gaussian mixture each worker draws itself (`rayganx.data.points`).

What is decoded as it is read streams through Ray Data on the worker: one small dataset per
epoch over this worker's batches, in order, decoded by Ray Data tasks across the cluster ahead of
training. Ray Data's own iterators keep no position to resume from and hand rows to whichever
worker asks first, so the order is made here and Ray Data only reads and decodes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from rayganx.data import sources as rdata
from rayganx.data import order
from rayganx.data.order import Position
from rayganx.job.spec import JobSpec


@dataclass
class Table:
    """Rows in Ray's object store, in the dataset's own order, block after block. Decoded
    blocks are dicts of NumPy arrays ("image" uint8 NxCxHxW, "label", maybe "synthetic");
    encoded ones are Arrow tables ("bytes", "label") that `decode` turns into images."""

    refs: list
    counts: list[int]
    decode: dict | None = None  # encoded rows: data.decode_image's options

    @property
    def n(self) -> int:
        return sum(self.counts)


@dataclass
class Files:
    files: rdata.ImageFiles
    decode: dict  # data.read_files' options

    @property
    def n(self) -> int:
        return len(self.files.paths)


@dataclass
class Points:
    mixture: str
    num_points: int
    seed: int

    @property
    def n(self) -> int:
        return self.num_points


# --------------------------------------------------------------------------- the driver's side


def decoded_bytes(spec: JobSpec, rows: int) -> int:
    d = spec.data
    return rows * d.channels * d.image_size ** 2  # uint8 images


def keep_decoded(spec: JobSpec, rows: int) -> bool:
    """Whether to decode the dataset once and keep it in the object store (data.cache)."""
    import ray

    d = spec.data
    if d.cache != "auto":
        return d.cache is True
    return decoded_bytes(spec, rows) <= ray.cluster_resources().get("object_store_memory", 0) / 4


def source(spec: JobSpec, split: str, rows: int, counter=None, synthetic=None):
    """The row source of a job's training split. rows: the planned count (for data.cache);
    synthetic: a checked data.synthetic, whose generated rows join the real ones (decoded)."""
    import ray

    d = spec.data
    if d.source == "gaussian_mixture":
        return Points(d.mixture, d.num_points, spec.train.seed)
    if d.source == "digits" and synthetic is None:
        # 1.8 MB at 32 px: made here and put once, on the driver's node (which outlives a lost worker node)
        images, labels = rdata.digits_images(d, split)
        return Table([ray.put({"image": images, "label": labels})], [len(labels)])
    if synthetic is not None or keep_decoded(spec, rows):
        ds = rdata.build(d, split, counter=counter)
        if synthetic is not None:
            from rayganx.data import synthetic as rsynthetic

            ds = rdata.canonical(rsynthetic.mixed(ds, rsynthetic.dataset(spec, synthetic)))
        return _table(ds)
    decode = dict(size=d.image_size, channels=d.channels, on_corrupt=d.on_corrupt,
                  crop=d.crop or (rdata.CELEBA_CROP if d.source == "celeba" else None))
    if d.source == "parquet":
        return _table(rdata.encoded_parquet(d, split), decode)
    return Files(rdata.image_files(d, split), decode)


def _table(ds, decode: dict | None = None) -> Table:
    """The dataset executed once, its blocks left where Ray Data made them, in its own order: their
    refs and row counts (from the blocks' metadata: no task reads them again here)."""
    refs, counts = [], []
    for bundle in ds.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            if entry.metadata.num_rows:
                refs.append(entry.ref)
                counts.append(entry.metadata.num_rows)
    return Table(refs, counts, decode)


def numpy_block(block) -> dict:
    """A block as a dict of NumPy arrays (zero-copy for the fixed-shape image tensors)."""
    if isinstance(block, dict):
        return block
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).to_batch_format("numpy")


# --------------------------------------------------------------------------- a worker's reader


class Reader:
    """One worker's batches: its slice of every global batch, from a position on, without end.
    Each batch is {"image" (uint8, or float32 2-D points), "label", "id", maybe "synthetic"} as
    tensors on `device`; `multiple`: a batch shortened by skipped corrupt files is cut to a
    multiple of it (PacGAN's packs)."""

    def __init__(self, src, batch_size: int, seed: int, rank: int = 0, world: int = 1, device="cpu",
                 counter=None, multiple: int = 1):
        self.src, self.batch, self.seed, self.rank, self.world = src, batch_size, seed, rank, world
        self.device, self.counter, self.multiple = device, counter, multiple
        self.blocks = self.starts = None
        if isinstance(src, Points):
            from rayganx.data.points import gaussian_mixture

            pts = gaussian_mixture(src.mixture, src.num_points, src.seed)[0]
            self.blocks = [{"image": pts, "label": np.zeros(len(pts), np.int64)}]
        elif isinstance(src, Table) and src.decode is None:
            import ray

            self.blocks = [numpy_block(b) for b in ray.get(src.refs)]  # views of the object store on this node
        if self.blocks is not None:
            self.starts = np.cumsum([0] + [len(b["label"]) for b in self.blocks])

    @property
    def n(self) -> int:
        return self.src.n

    def batches(self, start: Position = Position()) -> Iterator[tuple[Position, dict]]:
        """(the position before it, this worker's batch) for every global batch from `start` on."""
        if self.n < self.batch:
            raise rdata.DataError(f"data: {self.n} rows are fewer than one global batch "
                                  f"(train.batch_size={self.batch})")
        mine = ((pos, order.rank_slice(ids, self.rank, self.world))
                for pos, ids in order.global_batches(self.n, self.batch, self.seed, start))
        if self.blocks is not None:
            for pos, ids in mine:
                yield pos, self._tensors(self._gather(ids) | {"id": ids})
            return
        for epoch in _by_epoch(mine):
            yield from self._stream(epoch)

    def _gather(self, ids: np.ndarray) -> dict:
        where = np.searchsorted(self.starts, ids, side="right") - 1
        out = {}
        for col in self.blocks[0]:
            first = self.blocks[0][col]
            out[col] = np.empty((len(ids), *first.shape[1:]), first.dtype)
        for b in np.unique(where):
            mask = where == b
            for col, arr in self.blocks[b].items():
                out[col][mask] = arr[ids[mask] - self.starts[b]]
        return out

    def _tensors(self, batch: dict) -> dict:
        keep = len(batch["label"]) - len(batch["label"]) % self.multiple
        return {k: torch.from_numpy(np.ascontiguousarray(v[:keep])).to(self.device) for k, v in batch.items()}

    def _stream(self, epoch: list[tuple[Position, np.ndarray]]) -> Iterator[tuple[Position, dict]]:
        """The rest of an epoch read and decoded by Ray Data tasks, batch by batch, in order."""
        import ray

        if isinstance(self.src, Files):
            f = self.src.files
            items = [{"k": k, "path": [f.paths[i] for i in ids], "label": [f.labels[i] for i in ids],
                      "id": ids.tolist()} for k, (_, ids) in enumerate(epoch)]
            fetch = functools.partial(_read_files, url=f.url, endpoint_url=f.endpoint_url, counter=self.counter,
                                      **self.src.decode)
        else:
            items = [{"k": k, "id": ids.tolist()} for k, (_, ids) in enumerate(epoch)]
            fetch = functools.partial(_read_rows, refs=self.src.refs, starts=np.cumsum([0] + self.src.counts),
                                      counter=self.counter, **self.src.decode)
        ds = rdata.canonical(ray.data.from_items(items, override_num_blocks=len(items)))
        ds = rdata.canonical(ds.map_batches(fetch, batch_size=1, batch_format="numpy"))
        parts, expect = [], 0
        for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
            ks = block["k"]
            for k in np.unique(ks):  # ascending: the order is preserved
                while expect < k:  # every row of batch `expect` has arrived
                    yield epoch[expect][0], self._joined(parts, epoch[expect][0])
                    parts, expect = [], expect + 1
                parts.append({c: v[ks == k] for c, v in block.items() if c != "k"})
        while expect < len(epoch):
            yield epoch[expect][0], self._joined(parts, epoch[expect][0])
            parts, expect = [], expect + 1

    def _joined(self, parts: list[dict], pos: Position) -> dict:
        rows = sum(len(p["label"]) for p in parts)
        if rows < self.multiple or rows == 0:
            raise rdata.DataError(f"data: every image of a batch (epoch {pos.epoch}, rows {pos.sample}..) was "
                                  f"skipped as corrupt; too many corrupt files to train on")
        return self._tensors({c: np.concatenate([p[c] for p in parts]) for c in parts[0]})


def _by_epoch(mine) -> Iterator[list]:
    current, items = None, []
    for pos, ids in mine:
        if current is not None and pos.epoch != current:
            yield items
            items = []
        current = pos.epoch
        items.append((pos, ids))


def _flat(col) -> list:
    return list(col[0])  # batch_size=1: one item, whose cell holds the batch's list


def _read_files(item, *, url, endpoint_url, counter, **decode) -> dict:
    rows = {"path": _flat(item["path"]), "label": _flat(item["label"]), "id": _flat(item["id"])}
    out = rdata.read_files(rows, url=url, endpoint_url=endpoint_url, counter=counter, **decode)
    return out | {"k": np.full(len(out["label"]), int(item["k"][0]))}


def _read_rows(item, *, refs, starts, counter, **decode) -> dict:
    """Encoded rows by id from the Table's Arrow blocks, decoded."""
    import ray

    ids = np.asarray(_flat(item["id"]), dtype=np.int64)
    where = np.searchsorted(starts, ids, side="right") - 1
    blocks = dict(zip(np.unique(where).tolist(), ray.get([refs[b] for b in np.unique(where)])))
    images, labels, kept = [], [], []
    for i, b in zip(ids, where):
        row = blocks[int(b)].slice(int(i - starts[b]), 1).to_pylist()[0]
        arr = rdata.decode_image(row["bytes"], f"row {i}", counter=counter, **decode)
        if arr is not None:
            images.append(arr)
            labels.append(int(row["label"]))
            kept.append(int(i))
    out = rdata.stack_images(images, labels, decode["channels"], decode["size"], id=np.asarray(kept, dtype=np.int64))
    return out | {"k": np.full(len(kept), int(item["k"][0]))}
