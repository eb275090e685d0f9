"""The CelebA path measured side by side in one run, on a CelebA-shaped stand-in this script makes
(nothing is downloaded), with every object on a moto S3 server on loopback in its own process:

1. `rayganx data prepare` of the zip, laid out as the published img_align_celeba.zip, into
   Parquet shards (crop 108, 64 px): images/s, Ray's start included;
2. input-only throughput (a Ray Train worker iterating the job's Ray Data pipeline, no model)
   from (a) the folder of JPEGs and (b) the prepared Parquet, against what one 64 px DCGAN
   worker consumes (`rayganx.training.bench`, one process, same run);
3. `rayganx eval` (FID+KID) of a DCGAN-64 checkpoint at 1 and 2 workers: samples/s and the FID,
   which must agree.

    python docs/celeba_bench.py [--images 4000] [--eval-samples 2000]

Appends its rows to docs/records/perf_celeba.jsonl; `python docs/records.py --write` then makes
docs/performance.md's table from them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import records  # noqa: E402

JOBS = records.ROOT / "jobs"
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_process() -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return proc, endpoint


def faces(n: int) -> list[bytes]:
    """178x218 JPEGs of drawn face-ish shapes: CelebA's size and roughly its JPEG weight."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (178, 218), tuple(int(v) for v in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(img)
        cx, cy = 89 + int(rng.integers(-10, 10)), 109 + int(rng.integers(-10, 10))
        d.ellipse([cx - 40, cy - 50, cx + 40, cy + 50], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        for _ in range(3):
            x, y = int(rng.integers(0, 170)), int(rng.integers(0, 210))
            d.rectangle([x, y, x + 8, y + 8], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def cli(*args, env: dict, timeout: int = 1800) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "rayganx.cli", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=timeout, cwd=records.ROOT)
    if r.returncode != 0:
        raise SystemExit(f"rayganx {' '.join(map(str, args))} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


def bench_input(endpoint: str, source: str, path: str, gpu: bool) -> tuple[list[str], dict]:
    from rayganx.job import spec as jobspec
    from rayganx.training.bench import bench

    sets = [f"data.source={source}", f"data.path={path}", f"data.endpoint_url={endpoint}", "data.cache=false",
            "data.val_fraction=0", "scaling.num_workers=1", "train.batch_size=64"] + (["scaling.use_gpu=true"] if gpu else [])
    res = bench(jobspec.load(JOBS / "dcgan_celeba.yaml", sets), steps=12, warmup=3, workers=[1], stand_in=False)
    row = res["rayganx"][0]
    return sets, {"first_step_s": row["time_to_first_step"], "worker_images_per_s": row["images_per_s"],
                  "input_images_per_s": res["input_only"]["images_per_s"],
                  "input_multiple": res["input_only"]["multiple_of_consumption"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--gpu", action="store_true", help="train, bench and evaluate on GPUs (docs/gpu_check.sh)")
    args = ap.parse_args()
    os.environ.update(ENV)
    run = uuid.uuid4().hex[:8]
    proc, endpoint = moto_process()
    env = {**ENV, "AWS_ENDPOINT_URL": endpoint}
    work = Path(tempfile.mkdtemp(prefix="celeba_bench_"))
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        t0 = time.time()
        images = faces(args.images)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for i, data in enumerate(images, 1):
                z.writestr(f"img_align_celeba/{i:06d}.jpg", data)
        s3.put_object(Bucket="bench", Key="img_align_celeba.zip", Body=buf.getvalue())
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: s3.put_object(Bucket="bench", Key=f"jpeg/img_align_celeba/{i + 1:06d}.jpg",
                                                  Body=images[i]), range(len(images))))
        print(f"made and uploaded {len(images)} images (zip and folder) in {time.time() - t0:.0f} s", file=sys.stderr)
        common = {"run": run, "images": args.images}

        prep = ["data", "prepare", "s3://bench/img_align_celeba.zip", "--out", "s3://bench/celeba64", "--size", "64",
                "--crop", "108"]
        t0 = time.time()
        cli(*prep, env=env)
        wall = time.time() - t0
        rows = json.loads(boto3.client("s3", endpoint_url=endpoint).get_object(
            Bucket="bench", Key="celeba64/_rayganx_manifest.json")["Body"].read())["rows"]
        records.append("perf_celeba", job=None, sets=prep, seed=None, wall_s=wall, kind="prepare", **common,
                       metrics={"images": rows, "images_per_s": rows / wall, "wall_s": wall})
        print(f"prepare: {rows} images in {wall:.1f} s", file=sys.stderr)

        for source, path, label in (("image_folder", "s3://bench/jpeg", "JPEG folder (178x218, crop and resize per read)"),
                                    ("parquet", "s3://bench/celeba64", "prepared Parquet (64 px)")):
            t0 = time.time()
            sets, m = bench_input(endpoint, source, path, args.gpu)
            records.append("perf_celeba", job="jobs/dcgan_celeba.yaml", sets=sets, seed=0, wall_s=time.time() - t0,
                           kind="input", source=label, **common, metrics=m)
            print(label, m, file=sys.stderr)

        train = ["submit", JOBS / "dcgan_celeba.yaml", "--set", "data.source=parquet", "--set",
                 "data.path=s3://bench/celeba64", "--set", "train.epochs=null", "--set", "train.steps=2", "--set",
                 "train.batch_size=16", "--set", f"storage.path={work}/runs", "--set", "scaling.num_workers=1"]
        train += ["--set", "scaling.use_gpu=true"] if args.gpu else []
        cli(*train, env=env)
        ckpt = work / "runs" / "dcgan_celeba" / "checkpoint_000002"
        for workers in (1, 2):
            out = work / f"eval{workers}.json"
            argv = ["eval", ckpt, "--metrics", "fid,kid", "--num-samples", args.eval_samples, "--workers", workers,
                    "--json", out] + (["--gpu"] if args.gpu else [])
            t0 = time.time()
            cli(*argv, env=env)
            wall = time.time() - t0
            scores = json.loads(out.read_text())
            records.append("perf_celeba", job="jobs/dcgan_celeba.yaml", sets=[str(a) for a in argv[1:]], seed=0,
                           wall_s=wall, kind="eval", workers=workers, **common,
                           metrics={"samples": args.eval_samples, "samples_per_s": args.eval_samples / wall,
                                    "wall_s": wall, "fid": scores["fid"], "kid": scores["kid"]})
            print(f"eval {workers} worker(s): {wall:.1f} s, FID {scores['fid']:.4f}", file=sys.stderr)
    finally:
        proc.terminate()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(records.TABLES["perf-celeba"]())


if __name__ == "__main__":
    main()
