"""`rayganx data prepare`: a folder of images, or a zip of one (CelebA's img_align_celeba.zip as
published), local or on object storage, to Parquet shards that training reads fast.

Many small objects are the slow case of reading from object storage (a request per image); a
few large Parquet files are the fast one. Each image is centre-cropped and resized once here
(`--size 64 --crop 108` for CelebA, as the DCGAN reference code reads it) and stored as PNG
bytes, with its label where the layout has one (the class sub-folder) and its official split
where a partition file says (CelebA's list_eval_partition.txt). Ray Data tasks across the
cluster write the shards; every input image goes to the shard its place in the sorted listing
decides, so a re-run writes only the shards that are missing. The output folder is a plain
Parquet dataset (pandas, pyarrow, DuckDB, Spark and Ray Data open it as it is): the manifest,
`_rayganx_manifest.json`, has a leading underscore, which those readers skip.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import time
from dataclasses import dataclass, field

from rayganx.data.sources import IMAGE_EXTENSIONS, DataError, digits_arrays, to_array
from rayganx.store.storage import Store, contained, explain, relative_key

MANIFEST = "_rayganx_manifest.json"
FORMAT = "rayganx-prepared/1"
SPLITS = {"0": "train", "1": "val", "2": "test"}  # CelebA's list_eval_partition.txt


@dataclass
class Settings:
    size: int
    crop: int | None
    channels: int
    labels: bool
    shard_mb: float
    partition: str | None = None  # a partition file: "<file name> <0|1|2>" per line

    def key(self) -> dict:
        """What decides the shards' contents (the manifest of a re-run must match it)."""
        return {"size": self.size, "crop": self.crop, "channels": self.channels, "labels": self.labels,
                "shard_mb": self.shard_mb, "partition": bool(self.partition)}


@dataclass
class Plan:
    source: str
    endpoint_url: str | None
    members: list[str]  # image names inside the folder or zip, sorted
    labels: list[int]
    splits: list[str]
    classes: list[str]
    rows_per_shard: int
    settings: Settings
    zipped: bool
    corrupt: list[str] = field(default_factory=list)

    @property
    def shards(self) -> int:
        return -(-len(self.members) // self.rows_per_shard)

    def shard_rows(self, i: int) -> range:
        return range(i * self.rows_per_shard, min(len(self.members), (i + 1) * self.rows_per_shard))


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _open_zip(source: str, endpoint_url: str | None):
    import zipfile

    store = Store(source, endpoint_url)
    try:
        f = store.fs.open(store.root, "rb")  # ranged reads: a remote zip is never downloaded whole
        return zipfile.ZipFile(f)
    except zipfile.BadZipFile:
        raise DataError(f"{source}: not a zip file") from None
    except FileNotFoundError:
        raise DataError(f"{source}: does not exist") from None
    except Exception as e:  # noqa: BLE001
        raise explain(source, e) from None


def _images(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
                  and not posixpath.basename(n).startswith("."))


def _read_member(source: str, endpoint_url: str | None, zipped: bool, name: str, cache: dict) -> bytes:
    if zipped:
        if "zip" not in cache:
            cache["zip"] = _open_zip(source, endpoint_url)
        return cache["zip"].read(name)
    store = cache.setdefault("store", Store(source, endpoint_url))
    return store.read_bytes(name)


def _encode(data: bytes, s: Settings) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        arr = to_array(img, s.size, s.channels, s.crop)
    out = io.BytesIO()
    Image.fromarray(arr[0] if s.channels == 1 else arr.transpose(1, 2, 0)).save(out, format="PNG")
    return out.getvalue()


def plan(source: str, settings: Settings, endpoint_url: str | None = None) -> Plan:
    """List the input (a folder or a .zip), read the partition file, and size the shards from a
    sample of encoded images: before any shard is written."""
    zipped = source.lower().endswith(".zip")
    if zipped:
        members = _images(_open_zip(source, endpoint_url).namelist())
    else:
        store = Store(source, endpoint_url)
        if not store.exists():
            raise DataError(f"{source}: does not exist")
        members = _images([relative_key(f, store.root) for f in store.fs.find(store.root)])
    if not members:
        raise DataError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) there")
    for m in members:
        contained(m, source)
    classes: list[str] = []
    if settings.labels:
        classes = sorted({m.split("/")[-2] for m in members if "/" in m})
        if not classes:
            raise DataError(f"--labels: {source} has no class sub-folders")
    labels = [classes.index(m.split("/")[-2]) if classes and "/" in m else -1 for m in members]
    splits = [""] * len(members)
    if settings.partition:
        splits = _splits(settings.partition, members, endpoint_url)
    # Rows per shard from the first images' encoded size (the rest are alike: one dataset, one size).
    cache: dict = {}
    sample = []
    for m in members[:32]:
        try:
            sample.append(len(_encode(_read_member(source, endpoint_url, zipped, m, cache), settings)))
        except Exception:  # noqa: BLE001 - a corrupt one is counted when its shard is written
            continue
    per_image = max(1, sum(sample) // max(1, len(sample))) + 16
    rows = max(1, int(settings.shard_mb * 2**20 // per_image))
    return Plan(source, endpoint_url, members, labels, splits, classes, rows, settings, zipped)


def _splits(partition: str, members: list[str], endpoint_url: str | None) -> list[str]:
    text = Store(partition, endpoint_url).read_text() if "://" in partition else open(partition).read()
    by_name = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            by_name[parts[0]] = SPLITS.get(parts[1], parts[1])
    missing = [m for m in members if posixpath.basename(m) not in by_name]
    if missing:
        raise DataError(f"--partition {partition}: no line for {posixpath.basename(missing[0])} "
                        f"({len(missing)} image(s) without one)")
    return [by_name[posixpath.basename(m)] for m in members]


def write_shard(item: dict, *, source: str, endpoint_url: str | None, zipped: bool, settings: Settings,
                out_url: str) -> dict:
    """A Ray Data task: read, crop, resize and encode one shard's images; write the shard whole.
    The item carries the shard's own names, labels and splits (not the whole listing)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    i, s, cache = int(item["shard"][0]), settings, {}
    rows, corrupt = {"image": [], "label": [], "split": [], "name": []}, []
    for name, label, split in zip(item["names"][0], item["labels"][0], item["splits"][0]):
        try:
            png = _encode(_read_member(source, endpoint_url, zipped, str(name), cache), s)
        except Exception as e:  # noqa: BLE001 - PIL raises many types; counted, named, not fatal
            corrupt.append(f"{name}: {type(e).__name__}")
            continue
        rows["image"].append(png)
        rows["label"].append(int(label))
        rows["split"].append(str(split))
        rows["name"].append(str(name))
    columns = {"image": pa.array(rows["image"], pa.binary()), "name": pa.array(rows["name"], pa.string())}
    if s.labels:
        columns["label"] = pa.array(rows["label"], pa.int64())
    if s.partition:
        columns["split"] = pa.array(rows["split"], pa.string())
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), buf, row_group_size=1024)
    data = buf.getvalue().to_pybytes()
    Store(out_url, endpoint_url).write_bytes(data, shard_name(i))  # whole: a PUT, or a rename
    return {"shard": np.array([i]), "rows": np.array([len(rows["image"])]), "bytes": np.array([len(data)]),
            "sha256": np.array([hashlib.sha256(data).hexdigest()]), "corrupt": np.array([json.dumps(corrupt)])}


def existing(out: Store, p: Plan) -> dict[int, dict]:
    """Shards an earlier run of the same plan wrote: those its manifest records, and those it wrote
    but had no time to record (a shard is written whole, so one that is there is complete)."""
    if not out.exists(MANIFEST):
        return {}
    manifest = json.loads(out.read_text(MANIFEST))
    if manifest.get("settings") != p.settings.key() or manifest.get("images") != len(p.members):
        raise DataError(f"{out.url}: holds a dataset prepared with other settings or inputs "
                        f"({MANIFEST}); write to another folder")
    names = {posixpath.basename(f["name"]) for f in out.listdir()}
    done = {int(k): v for k, v in manifest.get("shards", {}).items() if shard_name(int(k)) in names}
    for i in range(p.shards):
        if i not in done and shard_name(i) in names:
            done[i] = _describe(out, i, [str(p.members[r]) for r in p.shard_rows(i)])
    return done


def _describe(out: Store, i: int, expected: list[str]) -> dict:
    """The record of a shard found written but not recorded; its corrupt images are the planned
    ones it does not hold (the shard keeps each image's name)."""
    import pyarrow.parquet as pq

    data = out.read_bytes(shard_name(i))
    table = pq.read_table(io.BytesIO(data), columns=["name"])
    held = set(table.column("name").to_pylist())
    return {"rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "corrupt": [f"{name}: unreadable (found by an earlier run)" for name in expected if name not in held]}


def run(p: Plan, out_url: str, progress=None) -> dict:
    """Write the missing shards with Ray Data (on the cluster this process joins, or an embedded
    one), then the manifest; returns it. progress(done, total) hears each shard written."""
    import ray

    from rayganx.job.cluster import init_ray

    out = Store(out_url, p.endpoint_url)
    done = existing(out, p)
    todo = [i for i in range(p.shards) if i not in done]
    manifest = {"format": FORMAT, "source": p.source, "settings": p.settings.key(), "images": len(p.members),
                "rows_per_shard": p.rows_per_shard, "classes": p.classes, "shards": {str(k): v for k, v in done.items()}}
    out.write_text(json.dumps(manifest | {"complete": False}, indent=1), MANIFEST)
    if todo:
        import functools

        init_ray()
        items = [{"shard": i, "names": [p.members[r] for r in p.shard_rows(i)],
                  "labels": [p.labels[r] for r in p.shard_rows(i)], "splits": [p.splits[r] for r in p.shard_rows(i)]}
                 for i in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(todo))
        write = functools.partial(write_shard, source=p.source, endpoint_url=p.endpoint_url, zipped=p.zipped,
                                  settings=p.settings, out_url=out_url)
        ds = ds.map_batches(write, batch_size=1, batch_format="numpy")
        stop_after = int(os.environ.get("RAYGANX_FAULT_PREPARE_STOP_AFTER") or 0)  # the tests' interruption
        for n, row in enumerate(ds.iter_rows(), 1):
            done[int(row["shard"])] = {"rows": int(row["rows"]), "bytes": int(row["bytes"]),
                                       "sha256": str(row["sha256"]), "corrupt": json.loads(row["corrupt"])}
            if progress:
                progress(len(done), p.shards)
            manifest["shards"] = {str(k): v for k, v in sorted(done.items())}
            out.write_text(json.dumps(manifest | {"complete": False}, indent=1), MANIFEST)
            if n == stop_after:
                raise KeyboardInterrupt
    corrupt = [c for s in done.values() for c in s["corrupt"]]
    content = hashlib.sha256("".join(done[i]["sha256"] for i in sorted(done)).encode()).hexdigest()
    manifest |= {"shards": {str(k): v for k, v in sorted(done.items())}, "rows": sum(s["rows"] for s in done.values()),
                 "bytes": sum(s["bytes"] for s in done.values()), "corrupt": corrupt, "content_sha256": content,
                 "complete": True, "time": time.time()}
    out.write_text(json.dumps(manifest, indent=1), MANIFEST)
    return manifest


def summary(manifest: dict) -> dict:
    return {k: manifest[k] for k in ("rows", "bytes", "corrupt", "content_sha256")} | {"shards": len(manifest["shards"])}


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
