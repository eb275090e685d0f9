"""Input pipelines on Ray Data.

Every source ends as rows of {"image": uint8 CxHxW, "label": int64}; decoding, crop and resize
run in `map_batches`, so they scale out with the cluster and stream into each Ray Train
worker's shard. Images stay uint8 until `model_input` scales them to [-1, 1] on the worker's
device: a quarter of float32's bytes through the object store, the shuffle buffer and the
host-to-device copy. Gaussian mixtures' 2-D points skip Ray Data (`rayganx.points`).
"""

from __future__ import annotations

import functools
import io
import logging
import posixpath
import zlib

import numpy as np

from rayganx.errors import UserError
from rayganx.spec import DataSpec
from rayganx.storage import Store, explain, pyarrow_filesystem

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "webp")
CELEBA_CROP = 108  # the DCGAN reference code's centre crop of aligned CelebA (178x218)


class DataError(UserError, ValueError):
    """A dataset problem phrased for the user: it names the path or file."""


# --------------------------------------------------------------------------- pixel work


def to_array(img, size: int, channels: int, crop: int | None) -> np.ndarray:
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    c = min(crop or min(w, h), w, h)
    left, top = (w - c) // 2, (h - c) // 2
    img = img.crop((left, top, left + c, top + c))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def model_input(x):
    """A batch as the networks take it: uint8 images to float32 in [-1, 1] (points pass through)."""
    import torch

    return x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x


def _in_split(key: bytes, split: str, val_fraction: float) -> bool:
    if split == "all":
        return True
    is_val = (zlib.crc32(key) % 10_000) < val_fraction * 10_000
    return is_val == (split == "val")


def _decode_batch(batch, *, size, channels, crop, on_corrupt, classes, root, split,
                  val_fraction, image_col, label_col, counter=None):
    """Decode encoded images (bytes) with their paths or labels into uint8 arrays."""
    from PIL import Image

    images, labels = [], []
    paths = batch.get("path")
    for i, data in enumerate(batch[image_col]):
        name = str(paths[i]) if paths is not None else f"row with {len(data)} bytes"
        key = name.encode() if paths is not None else bytes(data[:4096])
        if not _in_split(key, split, val_fraction):
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                arr = to_array(img, size, channels, crop)
        except Exception as e:  # PIL raises several types for bad files
            if on_corrupt == "fail":
                raise DataError(f"corrupt image {name}: {type(e).__name__}: {e} "
                                f"(set data.on_corrupt: skip to skip such files)") from None
            log.warning("skipping corrupt image %s: %s", name, e)
            if counter is not None:  # the run's monitor actor: it lives and ends with the run
                counter.skipped_file.remote(name)
            continue
        images.append(arr)
        if classes is not None:
            rel = posixpath.relpath(name, root)
            labels.append(classes.index(rel.split("/")[0]))
        elif label_col in batch:
            labels.append(int(batch[label_col][i]))
        else:
            labels.append(0)
    stacked = np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)
    return {"image": stacked, "label": np.asarray(labels, dtype=np.int64)}


def _resize_digits(batch, *, size, channels, split, val_fraction):
    from PIL import Image

    images, labels = [], []
    for raw, label, key in zip(batch["raw"], batch["label"], batch["key"]):
        if not _in_split(str(key).encode(), split, val_fraction):
            continue
        img = Image.fromarray(raw.astype(np.uint8), mode="L")
        images.append(to_array(img, size, channels, None))
        labels.append(int(label))
    stacked = np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)
    return {"image": stacked, "label": np.asarray(labels, dtype=np.int64)}


# --------------------------------------------------------------------------- sources


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as uint8 images (0..255) and labels; no download."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


def _list_images(store: Store) -> list[str]:
    return list(_listing(store.url, store.endpoint_url))


@functools.lru_cache(maxsize=8)
def _listing(url: str, endpoint_url: str | None) -> tuple[str, ...]:
    """The image files under a folder, listed once per process (planning, class discovery and
    the dataset all need them; on object storage each listing of 200k objects takes minutes)."""
    store = Store(url, endpoint_url)
    try:
        files = store.fs.find(store.root)
    except Exception as e:
        raise explain(store.url, e) from None
    return tuple(f for f in files if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)


def _open(data: DataSpec, path: str | None = None) -> Store:
    url = path or data.path
    store = Store(url, data.endpoint_url)
    if not store.exists():
        raise DataError(f"data.path: {url} does not exist")
    return store


def _parquet_files(store: Store) -> list[str]:
    """A .parquet file, or every one below a folder."""
    files = [store.root] if store.fs.isfile(store.root) else store.fs.find(store.root)
    files = [f for f in files if f.endswith(".parquet")]
    if not files:
        raise DataError(f"data.path: no .parquet files under {store.url}")
    return files


def _image_store(data: DataSpec) -> Store:
    """The folder of images: for CelebA, its img_align_celeba/ when the path holds one."""
    store = _open(data)
    if data.source == "celeba" and store.fs.isdir(store.path("img_align_celeba")):
        return _open(data, data.path.rstrip("/") + "/img_align_celeba")
    return store


def shuffled(ds, seed: int):
    """`ds` in a new order at every execution (every epoch), the sequence of orders fixed by `seed`.

    A full permutation of the rows, not of blocks: Ray Data reseeds from (seed, execution index)."""
    from ray.data import RandomSeedConfig

    return ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def build(data: DataSpec, split: str = "all", seed: int | None = 0, counter=None):
    """The Ray Dataset for a job's data section (split: all | train | val).

    seed: every execution (epoch) yields the rows in a fresh random order, reproducible from the
    seed; None: in the source's order (for a dataset that is cached, then `shuffled`, or read
    whole). counter: an actor with `skipped_file(name)` that hears of each corrupt file skipped."""
    import ray

    decode = dict(size=data.image_size, channels=data.channels, split=split,
                  val_fraction=data.val_fraction)
    if data.source == "digits":
        images, labels = digits_arrays()
        items = [{"raw": im, "label": int(lb), "key": i} for i, (im, lb) in enumerate(zip(images, labels))]
        if data.per_class and split != "val":
            keep = set(_digits_subset(data))
            items = [it for it in items if it["key"] in keep]
        ds = ray.data.from_items(items, override_num_blocks=min(4, len(items)))
        ds = ds.map_batches(functools.partial(_resize_digits, **decode), batch_format="numpy")
        return ds if seed is None else shuffled(ds, seed)

    if data.source == "gaussian_mixture":
        raise DataError("data.source: gaussian_mixture points are drawn in each worker (rayganx.points), "
                        "not read through Ray Data")

    store = _open(data)
    opts = dict(decode, crop=data.crop, on_corrupt=data.on_corrupt, image_col="bytes", counter=counter,
                label_col=data.label_column, classes=None, root=store.root)
    if data.source == "parquet":
        files = _parquet_files(store)
        columns = [data.image_column] + ([data.label_column] if data.labels else [])
        ds = ray.data.read_parquet(files, filesystem=pyarrow_filesystem(store.url, store.endpoint_url)).select_columns(columns)
        opts.update(image_col=data.image_column)
        if not data.labels:
            opts.update(label_col="__none__")
        # A file holds many rows, so shuffling files is not enough: the encoded rows are
        # shuffled, before decoding (a fraction of the decoded bytes).
        ds = ds if seed is None else shuffled(ds, seed)
        return ds.map_batches(functools.partial(_decode_batch, **opts), batch_format="numpy")

    # image_folder and celeba: encoded files, recursively
    store = _image_store(data)
    opts.update(root=store.root)
    if data.source == "celeba":
        opts.update(crop=data.crop or CELEBA_CROP)
    files = _list_images(store)
    if not files:
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {store.url}")
    if data.labels and data.source == "image_folder":
        classes = sorted({posixpath.relpath(f, store.root).split("/")[0] for f in files
                          if "/" in posixpath.relpath(f, store.root)})
        if not classes:
            raise DataError(f"data.labels: no class sub-folders under {store.url}")
        opts.update(classes=classes)
    # One file is one row: a permutation of the file list is a permutation of the dataset, drawn
    # while listing, so decoding still streams (a row shuffle would wait for a whole decoded epoch).
    from ray.data import FileShuffleConfig

    order = None if seed is None else FileShuffleConfig(seed=seed, reseed_after_execution=True)
    where = store.root
    if data.per_class and split != "val":
        where = files = _folder_subset(data, store, files)
    ds = ray.data.read_binary_files(where, filesystem=pyarrow_filesystem(store.url, store.endpoint_url),
                                    include_paths=True, shuffle=order,
                                    file_extensions=list(IMAGE_EXTENSIONS), override_num_blocks=min(len(files), 64))
    return ds.map_batches(functools.partial(_decode_batch, **opts), batch_format="numpy")


def first_per_class(keys, labels, k: int) -> list:
    """The first k keys of each label, in the given order: the low-data subset (data.per_class)."""
    seen: dict = {}
    out = []
    for key, label in zip(keys, labels):
        if seen.get(label, 0) < k:
            seen[label] = seen.get(label, 0) + 1
            out.append(key)
    return out


def _digits_subset(data: DataSpec) -> list[int]:
    """data.per_class on digits: the first k of each class among the training split's rows (in
    the dataset's own order), whether a classifier or a GAN trains on them, so a GAN and a
    classifier with the same k see the same images and neither sees the held-out ones."""
    _, labels = digits_arrays()
    train = [i for i in range(len(labels)) if _in_split(str(i).encode(), "train", data.val_fraction)]
    return first_per_class(train, [int(labels[i]) for i in train], data.per_class)


def _folder_subset(data: DataSpec, store: Store, files) -> list[str]:
    """data.per_class on an image folder: the first k files (by path) of each class sub-folder
    among the training split's files."""
    train = sorted(f for f in files if _in_split(f.encode(), "train", data.val_fraction)
                   and "/" in posixpath.relpath(f, store.root))
    return first_per_class(train, [posixpath.relpath(f, store.root).split("/")[0] for f in train], data.per_class)


def num_classes(data: DataSpec) -> int:
    """Label count for classifiers and conditional GANs."""
    if data.source == "digits":
        return 10
    if data.source == "gaussian_mixture":
        return 8 if data.mixture == "ring" else 25
    store = _open(data)
    if data.source == "image_folder":
        return len({posixpath.relpath(f, store.root).split("/")[0] for f in _list_images(store)
                    if "/" in posixpath.relpath(f, store.root)})
    if data.source == "parquet":
        import pyarrow.parquet as pq

        labels = set()
        for f in _parquet_files(store):
            with store.fs.open(f, "rb") as fh:
                labels.update(pq.read_table(fh, columns=[data.label_column]).column(0).to_pylist())
        return int(max(labels)) + 1
    raise DataError(f"data.labels: source {data.source} has no labels")


# --------------------------------------------------------------------------- prepare


def prepare_digits(out: str, fmt: str, size: int = 32, endpoint_url: str | None = None) -> int:
    """Write scikit-learn's digits in the on-disk formats users have (folder / parquet)."""
    from PIL import Image

    images, labels = digits_arrays()
    store = Store(out, endpoint_url)
    encoded = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im, mode="L").resize((size, size), Image.BICUBIC).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    if fmt == "folder":
        for i, (data, label) in enumerate(zip(encoded, labels)):
            store.write_bytes(data, str(label), f"{i:05d}.png")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"image": pa.array(encoded, pa.binary()), "label": pa.array(labels)})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        store.write_bytes(buf.getvalue().to_pybytes(), "digits.parquet")
    else:
        raise DataError(f"--format: expected folder or parquet, got {fmt!r}")
    return len(encoded)


def count_rows(data: DataSpec, split: str = "all") -> int:
    """Rows one epoch yields, without decoding anything (epochs are converted to steps)."""
    if data.per_class and split != "val":
        if data.source == "digits":
            return len(_digits_subset(data))
        store = _image_store(data)
        return len(_folder_subset(data, store, _list_images(store)))
    if data.source == "digits":
        return sum(_in_split(str(i).encode(), split, data.val_fraction) for i in range(1797))
    if data.source == "gaussian_mixture":
        return data.num_points
    store = _open(data)
    if data.source == "parquet":
        import pyarrow.parquet as pq

        rows = 0
        for f in _parquet_files(store):
            with store.fs.open(f, "rb") as fh:
                rows += pq.ParquetFile(fh).metadata.num_rows
        frac = {"all": 1.0, "train": 1 - data.val_fraction, "val": data.val_fraction}[split]
        return int(rows * frac)
    return sum(_in_split(f.encode(), split, data.val_fraction) for f in _list_images(_image_store(data)))


# --------------------------------------------------------------------------- image grids


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float NCHW (torch or numpy) to uint8 NCHW."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return ((arr.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 CHW image (1 or 3 channels) as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images, nrow: int, pad: int = 2) -> bytes:
    """PNG bytes of an image grid, `nrow` images per row."""
    from PIL import Image

    u8 = to_uint8(images)
    n, c, h, w = u8.shape
    rows = -(-n // nrow)
    canvas = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[y:y + h, x:x + w] = u8[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
