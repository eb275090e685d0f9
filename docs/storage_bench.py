"""Object-storage costs of a run, against an S3 server on this machine (moto on loopback).

    python docs/storage_bench.py input --files 2000 20000     # image folder and Parquet on S3
    python docs/storage_bench.py checkpoint                   # the step that checkpoints to S3

`input`: for N small JPEGs written as an `image_folder` and as Parquet shards, the time from
`rayganx bench`'s start of a run to its first training step, and the input pipeline's
images/s alone (Ray Data feeding a Train worker with no model), next to what one 64 px DCGAN
worker consumes. `checkpoint`: a 64 px DCGAN run to S3 that logs every step and checkpoints
every 10, with the upload asynchronous (the default) and synchronous; the step after each
checkpoint against the median step.

Run it from a checkout with the package importable; it prints Markdown tables.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def moto(endpoint: str | None = None):
    """A moto S3 server in this process, or the one at `endpoint` (e.g. `python -m moto.server
    -p 5123` in its own process: it keeps the uploaded set between a before and an after run, and
    its request handling does not share this process's interpreter lock)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = None
    if endpoint is None:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    if "bench" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket="bench")
    return server, endpoint, s3


def uploaded(s3, prefix: str) -> bool:
    return s3.list_objects_v2(Bucket="bench", Prefix=prefix + "/", MaxKeys=1).get("KeyCount", 0) > 0


def jpegs(n: int, size: int = 64) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(16)]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(base[i % 16]).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def upload_folder(s3, prefix: str, images: list[bytes]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket="bench", Key=f"{prefix}/{i % 10}/{i:06d}.jpg", Body=images[i]),
                      range(len(images))))


def upload_parquet(s3, prefix: str, images: list[bytes], per_shard: int = 2000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for k in range(0, len(images), per_shard):
        chunk = images[k:k + per_shard]
        table = pa.table({"image": chunk, "label": [i % 10 for i in range(len(chunk))]})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=500)
        s3.put_object(Bucket="bench", Key=f"{prefix}/part-{k // per_shard:04d}.parquet", Body=buf.getvalue())


def bench_input(endpoint: str, source: str, path: str) -> dict:
    from rayganx.job import spec as jobspec
    from rayganx.training.bench import bench

    spec = jobspec.load(JOBS / "dcgan_celeba.yaml", [
        f"data.source={source}", f"data.path={path}", f"data.endpoint_url={endpoint}", "data.cache=false",
        "scaling.num_workers=1", "train.batch_size=64", "model.ngf=64", "model.ndf=64"])
    res = bench(spec, steps=20, warmup=5, workers=[1], stand_in=False)
    row = res["rayganx"][0]
    return {"first_step_s": row["time_to_first_step"], "worker_images_per_s": row["images_per_s"],
            "input_images_per_s": res["input_only"]["images_per_s"],
            "input_multiple": res["input_only"]["multiple_of_consumption"]}


def cmd_input(files: list[int], endpoint: str | None) -> None:
    server, endpoint, s3 = moto(endpoint)
    rows = []
    try:
        for n in files:
            if not uploaded(s3, f"parquet{n}"):
                images = jpegs(n)
                t0 = time.time()
                upload_folder(s3, f"folder{n}", images)
                upload_parquet(s3, f"parquet{n}", images)
                print(f"uploaded {n} images twice in {time.time() - t0:.0f} s", file=sys.stderr)
            for source, path in (("image_folder", f"s3://bench/folder{n}"), ("parquet", f"s3://bench/parquet{n}")):
                r = bench_input(endpoint, source, path)
                rows.append((n, source, r))
                print(n, source, r, file=sys.stderr)
    finally:
        if server:
            server.stop()
    print("| files | source | first step (s) | input only (img/s) | one 64 px DCGAN worker (img/s) | input / need |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for n, source, r in rows:
        print(f"| {n:,} | {source} | {r['first_step_s']:.1f} | {r['input_images_per_s']:.0f} | "
              f"{r['worker_images_per_s']:.0f} | {r['input_multiple']:.1f}x |")


def cmd_checkpoint(endpoint: str | None, uploads: list[str]) -> None:
    from rayganx.training import runner
    from rayganx.job import spec as jobspec
    from rayganx.store.runs import read_metrics
    from rayganx.store.storage import Store

    server, endpoint, s3 = moto(endpoint)
    out = []
    try:
        for mode in ["true" if u == "async" else "false" for u in uploads]:
            spec = jobspec.load(JOBS / "dcgan_celeba.yaml", [
                f"name=ckpt_async_{mode}_{int(time.time())}", "data.source=digits", "data.channels=1", "data.image_size=64",
                "scaling.num_workers=1", "train.batch_size=32", "train.steps=60", "train.epochs=null",
                "train.log_every=1", "samples.every=1000", "storage.checkpoint_every=10",
                "storage.path=s3://bench/runs", f"storage.endpoint_url={endpoint}",
                f"storage.async_upload={mode}", "storage.keep=2"])
            runner.run(spec)
            rows = [m for m in read_metrics(Store(spec.run_url, endpoint)) if "step_time" in m and m["step"] > 10]
            after = [m["step_time"] for m in rows if m["step"] % 10 == 1]
            normal = [m["step_time"] for m in rows if m["step"] % 10 not in (0, 1)]
            out.append((mode, statistics.median(normal), statistics.median(after)))
    finally:
        if server:
            server.stop()
    print("| checkpoint upload | median step (ms) | step after a checkpoint (ms, median) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for mode, normal, after in out:
        print(f"| {'asynchronous' if mode == 'true' else 'synchronous'} | {normal * 1e3:.0f} | {after * 1e3:.0f} | "
              f"{after / normal:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("input")
    p.add_argument("--files", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--endpoint", help="an S3 server already running (uploads only what is missing)")
    p = sub.add_parser("checkpoint")
    p.add_argument("--endpoint", help="an S3 server already running")
    p.add_argument("--uploads", nargs="+", choices=["async", "sync"], default=["async", "sync"])
    args = ap.parse_args()
    cmd_input(args.files, args.endpoint) if args.cmd == "input" else cmd_checkpoint(args.endpoint, args.uploads)


if __name__ == "__main__":
    main()
