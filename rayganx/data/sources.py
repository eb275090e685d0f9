"""Datasets on Ray Data: every image source as rows of {"image": uint8 CxHxW, "label": int64}.

Listing, splitting, reading and decoding (crop, resize) live here; decoding runs in Ray Data
tasks (`map_batches`), so it scales out with the cluster. Images stay uint8 until `model_input`
scales them to [-1, 1] on the worker's device: a quarter of float32's bytes through the object
store and the host-to-device copy. The order training reads rows in is `rayganx.data.rows`; 2-D
mixtures' points are `rayganx.data.points`.
"""

from __future__ import annotations

import functools
import io
import logging
import posixpath
import zlib
from dataclasses import dataclass

import numpy as np

from rayganx.job.errors import UserError
from rayganx.job.sections import DataSpec
from rayganx.store.pyarrow_fs import pyarrow_filesystem
from rayganx.store.storage import Store, explain, relative_key

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


def in_split(key: bytes, split: str, val_fraction: float) -> bool:
    if split == "all":
        return True
    is_val = (zlib.crc32(key) % 10_000) < val_fraction * 10_000
    return is_val == (split == "val")


def decode_image(data, name: str, *, size, channels, crop, on_corrupt, counter=None):
    """One encoded image as uint8 CxHxW, or None when it is corrupt and on_corrupt is skip."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_array(img, size, channels, crop)
    except Exception as e:  # PIL raises several types for bad files
        if on_corrupt == "fail":
            raise DataError(f"corrupt image {name}: {type(e).__name__}: {e} "
                            f"(set data.on_corrupt: skip to skip such files)") from None
        log.warning("skipping corrupt image %s: %s", name, e)
        if counter is not None:  # the run's monitor; waited for: this task's call is not ordered with
            import ray           # the driver's later read of the list, and could land after its summary

            ray.get(counter.skipped_file.remote(name), timeout=60)
        return None


def stack_images(images: list, labels: list, channels: int, size: int, **extra) -> dict:
    stacked = np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)
    return {"image": stacked, "label": np.asarray(labels, dtype=np.int64)} | extra


def decode_rows(batch, *, size, channels, crop, on_corrupt, split, val_fraction, image_col, label_col,
                  counter=None):
    """Encoded images (bytes) of Parquet rows (or `rayganx generate` parts) into uint8 arrays.
    Rows are split by their content (the first 4 kB): the same rows, wherever the file is."""
    images, labels = [], []
    for i, data in enumerate(batch[image_col]):
        if not in_split(bytes(data[:4096]), split, val_fraction):
            continue
        arr = decode_image(data, f"row with {len(data)} bytes", size=size, channels=channels, crop=crop,
                           on_corrupt=on_corrupt, counter=counter)
        if arr is None:
            continue
        images.append(arr)
        labels.append(int(batch[label_col][i]) if label_col in batch else 0)
    return stack_images(images, labels, channels, size)


def read_files(batch, *, url, endpoint_url, size, channels, crop, on_corrupt, counter=None):
    """Image files, read and decoded: rows {"path", "label", "id"} in, {"image", "label", "id"} out
    (a corrupt file skipped is a row fewer)."""
    fs = _arrow_fs(url, endpoint_url)
    images, labels, ids = [], [], []
    for path, label, ident in zip(batch["path"], batch["label"], batch["id"]):
        with fs.open_input_stream(str(path)) as f:
            data = f.read()
        arr = decode_image(data, str(path), size=size, channels=channels, crop=crop, on_corrupt=on_corrupt,
                           counter=counter)
        if arr is not None:
            images.append(arr)
            labels.append(int(label))
            ids.append(int(ident))
    return stack_images(images, labels, channels, size, id=np.asarray(ids, dtype=np.int64))


@functools.lru_cache(maxsize=4)
def _arrow_fs(url: str, endpoint_url: str | None):
    return pyarrow_filesystem(url, endpoint_url)


# --------------------------------------------------------------------------- sources


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as uint8 images (0..255) and labels; no download."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


@functools.lru_cache(maxsize=8)
def _sized_listing(url: str, endpoint_url: str | None) -> tuple[tuple[str, int], ...]:
    """The image files under a folder with their sizes, sorted, listed once per process (planning,
    class discovery, the dataset and its fingerprint all need them; on object storage each
    listing of 200k objects takes minutes)."""
    store = Store(url, endpoint_url)
    try:
        files = store.fs.find(store.root, detail=True)
    except Exception as e:
        raise explain(store.url, e) from None
    return tuple(sorted((f, int(info.get("size") or 0)) for f, info in files.items()
                       if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS))


def _listing(url: str, endpoint_url: str | None) -> tuple[str, ...]:
    return tuple(f for f, _ in _sized_listing(url, endpoint_url))


def fingerprint(data: DataSpec) -> str:
    """A hash of a dataset's content as far as a listing tells it without reading every file: each
    file's path (relative to the dataset's folder) and size, each Parquet file's rows and size (a
    prepared dataset's manifest hash when it has one). The same data on local disk, object storage
    or a mount has the same fingerprint; caches of what was computed from it are keyed by it."""
    import hashlib

    h = hashlib.sha256(f"{data.source}|{data.image_size}|{data.channels}|{data.crop}|{data.mixture}".encode())
    if data.source == "digits":
        h.update(b"sklearn-digits")
    elif data.source == "gaussian_mixture":
        h.update(str(data.num_points).encode())
    elif data.source == "parquet":
        import pyarrow.parquet as pq

        store = _open(data)
        for f in _parquet_files(store):
            with store.fs.open(f, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
            h.update(f"{relative_key(f, store.root)}|{meta.num_rows}|{meta.serialized_size}".encode())
    else:
        store = _image_store(data)
        for f, size in _sized_listing(store.url, store.endpoint_url):
            h.update(f"{posixpath.relpath(f, store.root)}|{size}\n".encode())
    return h.hexdigest()


def _open(data: DataSpec, path: str | None = None) -> Store:
    url = path or data.path
    store = Store(url, data.endpoint_url)
    if not store.exists():
        raise DataError(f"data.path: {url} does not exist")
    return store


def _parquet_files(store: Store) -> list[str]:
    """A .parquet file, or every one below a folder (sorted: the rows' own order)."""
    files = [store.root] if store.fs.isfile(store.root) else store.fs.find(store.root)
    files = sorted(f for f in files if f.endswith(".parquet") and not posixpath.basename(f).startswith(("_", ".")))
    if not files:
        raise DataError(f"data.path: no .parquet files under {store.url}")
    return files


def _image_store(data: DataSpec) -> Store:
    """The folder of images: for CelebA, its img_align_celeba/ when the path holds one."""
    store = _open(data)
    if data.source == "celeba" and store.fs.isdir(store.path("img_align_celeba")):
        return _open(data, data.path.rstrip("/") + "/img_align_celeba")
    return store


@dataclass(frozen=True)
class ImageFiles:
    """A folder's images of one split, in path order: where they are, their labels (0 without)."""

    url: str
    endpoint_url: str | None
    paths: tuple[str, ...]  # inside the folder's filesystem (what pyarrow opens)
    labels: tuple[int, ...]
    classes: tuple[str, ...] = ()


def image_files(data: DataSpec, split: str = "all") -> ImageFiles:
    """The image files a split reads. The split is keyed by each file's path relative to the
    dataset's folder, so the same dataset on local disk, object storage or a mount splits the same
    way. With labels, the class is the first sub-folder; images beside the class folders have none
    and are skipped, each named in one warning."""
    store = _image_store(data)
    files = _listing(store.url, store.endpoint_url)
    if not files:
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {store.url}")
    rel = [posixpath.relpath(f, store.root) for f in files]
    classes: tuple[str, ...] = ()
    if data.labels and data.source == "image_folder":
        stray = [r for r in rel if "/" not in r]
        if stray:
            log.warning("data.path: skipping %d image(s) outside the class sub-folders of %s: %s", len(stray),
                        store.url, ", ".join(stray[:5]) + (" ..." if len(stray) > 5 else ""))
        classes = tuple(sorted({r.split("/")[0] for r in rel if "/" in r}))
        if not classes:
            raise DataError(f"data.labels: no class sub-folders under {store.url}")
    keep = [i for i, r in enumerate(rel) if in_split(r.encode(), split, data.val_fraction)
            and (not classes or "/" in r)]
    labels = [classes.index(rel[i].split("/")[0]) if classes else 0 for i in keep]
    if data.classes:
        keep, labels = [i for i, lb in zip(keep, labels) if lb in data.classes], [lb for lb in labels
                                                                                   if lb in data.classes]
    if data.per_class and split != "val":
        chosen = set(first_per_class(keep, labels, data.per_class))
        labels = [lb for i, lb in zip(keep, labels) if i in chosen]
        keep = [i for i in keep if i in chosen]
    return ImageFiles(store.url, store.endpoint_url, tuple(files[i] for i in keep), tuple(labels), classes)


def canonical(ds):
    """`ds` executed in its own order: a dataset's rows have ids (their place in it) only when every
    execution yields them alike, whatever finished first."""
    ds.context.execution_options.preserve_order = True
    return ds


def build(data: DataSpec, split: str = "all", counter=None):
    """The Ray Dataset of a job's data section (split: all | train | val), decoded to
    {"image": uint8 CxHxW, "label": int64}, in the source's own order (path order, row order).

    Training does not read it as a stream: `rayganx.data.rows` orders its rows by (seed, epoch).
    counter: an actor with `skipped_file(name)` that hears of each corrupt file skipped."""
    import ray

    decode = dict(size=data.image_size, channels=data.channels)
    if data.source == "digits":
        images, labels = digits_images(data, split)
        rows = [{"image": im, "label": int(lb)} for im, lb in zip(images, labels)]
        return canonical(ray.data.from_items(rows, override_num_blocks=min(4, len(rows))))

    if data.source == "gaussian_mixture":
        raise DataError("data.source: gaussian_mixture points are drawn in each worker (rayganx.data.points), "
                        "not read through Ray Data")

    if data.source == "parquet":
        store = _open(data)
        files = _parquet_files(store)
        columns = [data.image_column] + ([data.label_column] if data.labels else [])
        ds = ray.data.read_parquet(files, filesystem=pyarrow_filesystem(store.url, store.endpoint_url)).select_columns(columns)
        opts = decode | dict(crop=data.crop, on_corrupt=data.on_corrupt, split=split, val_fraction=data.val_fraction,
                             image_col=data.image_column, label_col=data.label_column if data.labels else "__none__",
                             counter=counter)
        return canonical(ds.map_batches(functools.partial(decode_rows, **opts), batch_format="numpy"))

    # image_folder and celeba: encoded files, recursively
    found = image_files(data, split)
    rows = [{"path": p, "label": lb, "id": i} for i, (p, lb) in enumerate(zip(found.paths, found.labels))]
    # Blocks of 512 files or more: each is a task (and on a cold cluster, a worker to start).
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 512, 256)))
    crop = data.crop or (CELEBA_CROP if data.source == "celeba" else None)
    read = functools.partial(read_files, url=found.url, endpoint_url=found.endpoint_url, crop=crop,
                             on_corrupt=data.on_corrupt, counter=counter, **decode)
    return canonical(ds.map_batches(read, batch_format="numpy", batch_size=256))


def encoded_parquet(data: DataSpec, split: str = "all"):
    """A Parquet source's rows of one split, still encoded: {"bytes", "label"}, in row order."""
    import ray

    store = _open(data)
    columns = [data.image_column] + ([data.label_column] if data.labels else [])
    ds = ray.data.read_parquet(_parquet_files(store), filesystem=pyarrow_filesystem(store.url, store.endpoint_url))
    keep = functools.partial(_split_rows, split=split, val_fraction=data.val_fraction, image_col=data.image_column,
                             label_col=data.label_column if data.labels else None)
    return canonical(ds.select_columns(columns).map_batches(keep, batch_format="pyarrow"))


def _split_rows(table, *, split, val_fraction, image_col, label_col):
    import pyarrow as pa

    data = table.column(image_col).to_pylist()
    mask = pa.array([in_split(bytes(b[:4096]), split, val_fraction) for b in data])
    labels = table.column(label_col).cast(pa.int64()) if label_col else pa.array(np.zeros(len(data), np.int64))
    return pa.table({"bytes": table.column(image_col), "label": labels}).filter(mask)


def digits_images(data: DataSpec, split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits at the job's size, one split (data.per_class applied): in memory."""
    from PIL import Image

    raw, labels = digits_arrays()
    keep = _digits_rows(data, split)
    images = [to_array(Image.fromarray(raw[i], mode="L"), data.image_size, data.channels, None) for i in keep]
    return np.stack(images), labels[keep]


def _digits_rows(data: DataSpec, split: str) -> list[int]:
    """The digits a split reads: data.val_fraction's split, then data.classes, then data.per_class."""
    if data.per_class and split != "val":
        return _digits_subset(data)
    _, labels = digits_arrays()
    return [i for i in range(len(labels)) if in_split(str(i).encode(), split, data.val_fraction)
            and (not data.classes or int(labels[i]) in data.classes)]


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
    train = [i for i in range(len(labels)) if in_split(str(i).encode(), "train", data.val_fraction)
             and (not data.classes or int(labels[i]) in data.classes)]
    return first_per_class(train, [int(labels[i]) for i in train], data.per_class)


def num_classes(data: DataSpec) -> int:
    """Label count for classifiers and conditional GANs."""
    if data.source == "digits":
        return 10
    if data.source == "gaussian_mixture":
        from rayganx.data.points import mixture_centres

        return len(mixture_centres(data.mixture))
    if data.source == "image_folder":
        return len(image_files(data).classes)
    if data.source == "parquet":
        import pyarrow.parquet as pq

        store = _open(data)
        labels = set()
        for f in _parquet_files(store):
            with store.fs.open(f, "rb") as fh:
                labels.update(pq.read_table(fh, columns=[data.label_column]).column(0).to_pylist())
        return int(max(labels)) + 1
    raise DataError(f"data.labels: source {data.source} has no labels")


def count_rows(data: DataSpec, split: str = "all") -> int:
    """Rows one epoch yields, without decoding anything (epochs are converted to steps)."""
    if data.source == "digits":
        return len(_digits_rows(data, split))
    if data.source == "gaussian_mixture":
        return data.num_points
    if data.source == "parquet":
        import pyarrow.parquet as pq

        store = _open(data)
        rows = 0
        for f in _parquet_files(store):
            with store.fs.open(f, "rb") as fh:
                rows += pq.ParquetFile(fh).metadata.num_rows
        frac = {"all": 1.0, "train": 1 - data.val_fraction, "val": data.val_fraction}[split]
        return int(rows * frac)
    return len(image_files(data, split).paths)
