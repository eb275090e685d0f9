"""The CelebA path at scale, on a CelebA-shaped stand-in the test makes (nothing is downloaded):
the published zip's layout on the S3 server, prepared into Parquet shards by Ray Data, interrupted
and re-run, trained on, and evaluated across workers."""

import io
import json
import zipfile

import boto3
import numpy as np
import pytest
from PIL import Image, ImageDraw

from rayganx.store.storage import Store
from tests.conftest import JOBS, rayganx

BUCKET = "s3://rayganx-test/celeba"


def celeba_zip(n: int, corrupt: int = 1) -> tuple[bytes, str]:
    """A zip laid out as img_align_celeba.zip (img_align_celeba/000001.jpg, ... 178x218 JPEGs of
    drawn faces-ish shapes), with `corrupt` broken files among them, and its partition file."""
    rng = np.random.default_rng(0)
    buf, lines = io.BytesIO(), []
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(1, n + 1):
            name = f"{i:06d}.jpg"
            img = Image.new("RGB", (178, 218), tuple(int(v) for v in rng.integers(0, 255, 3)))
            d = ImageDraw.Draw(img)
            cx, cy = 89 + int(rng.integers(-10, 10)), 109 + int(rng.integers(-10, 10))
            d.ellipse([cx - 40, cy - 50, cx + 40, cy + 50], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=90)
            data = out.getvalue() if i > corrupt else b"\xff\xd8 not a jpeg"
            z.writestr(f"img_align_celeba/{name}", data)
            lines.append(f"{name} {0 if i <= n * 0.8 else 1 if i <= n * 0.9 else 2}")
    return buf.getvalue(), "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def prepared(s3_server, ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("celeba")
    data, partition = celeba_zip(60)
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket="rayganx-test", Key="celeba/img_align_celeba.zip",
                                                           Body=data)
    (tmp / "list_eval_partition.txt").write_text(partition)
    return {"tmp": tmp, "endpoint": s3_server, "env": {**ray_head.driver_env(), "AWS_ENDPOINT_URL": s3_server},
            "args": ["data", "prepare", f"{BUCKET}/img_align_celeba.zip", "--out", f"{BUCKET}/celeba64", "--size", "64",
                     "--crop", "108", "--shard-mb", "0.02", "--partition", str(tmp / "list_eval_partition.txt")]}


def test_prepare_a_celeba_zip_on_s3_interrupted_and_rerun_writes_only_missing_shards(prepared):
    env, endpoint = prepared["env"], prepared["endpoint"]
    r = rayganx(*prepared["args"], env={**env, "RAYGANX_FAULT_PREPARE_STOP_AFTER": "2"})
    assert r.returncode == 130 and "only the missing ones" in r.stderr, r.stdout + r.stderr
    out = Store(f"{BUCKET}/celeba64", endpoint)
    before = {f["name"]: f.get("LastModified") for f in out.listdir() if f["name"].endswith(".parquet")}
    assert before and not json.loads(out.read_text("_rayganx_manifest.json"))["complete"]
    r = rayganx(*prepared["args"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote 59 images" in r.stdout and "skipped 1 corrupt image(s): img_align_celeba/000001.jpg" in r.stderr
    after = {f["name"]: f.get("LastModified") for f in out.listdir() if f["name"].endswith(".parquet")}
    assert all(after[k] == v for k, v in before.items()), "a shard written before the interruption was rewritten"
    assert len(after) > len(before)
    manifest = json.loads(out.read_text("_rayganx_manifest.json"))
    assert manifest["complete"] and manifest["rows"] == 59 and len(manifest["content_sha256"]) == 64
    assert manifest["settings"] == {"size": 64, "crop": 108, "channels": 3, "labels": False, "shard_mb": 0.02,
                                    "partition": True}
    # A plain Parquet dataset: pandas reads the folder as it is (the manifest's leading "_" is skipped).
    import pandas as pd

    frame = pd.read_parquet(f"{BUCKET}/celeba64", storage_options={"client_kwargs": {"endpoint_url": endpoint}})
    assert len(frame) == 59 and set(frame["split"]) == {"train", "val", "test"}
    img = Image.open(io.BytesIO(frame["image"].iloc[0]))
    assert img.size == (64, 64) and img.mode == "RGB"
    # the same command again: nothing left to write
    r = rayganx(*prepared["args"], env=env)
    assert r.returncode == 0 and {f["name"]: f.get("LastModified") for f in out.listdir()
                                  if f["name"].endswith(".parquet")} == after


def test_dcgan_celeba_trains_from_the_shards_and_2_workers_evaluate_as_1(prepared):
    env, endpoint, tmp = prepared["env"], prepared["endpoint"], prepared["tmp"]
    if not Store(f"{BUCKET}/celeba64", endpoint).exists("_rayganx_manifest.json"):
        assert rayganx(*prepared["args"], env=env).returncode == 0
    sets = ["--set", "data.source=parquet", "--set", f"data.path={BUCKET}/celeba64", "--set",
            f"data.endpoint_url={endpoint}", "--set", "train.epochs=null", "--set", "train.steps=2",
            "--set", "train.batch_size=8",
            "--set", "model.ngf=8", "--set", "model.ndf=8", "--set", f"storage.path={tmp}/runs",
            "--set", "storage.checkpoint_every=2", "--set", "samples.every=2", "--set", "train.log_every=1"]
    r = rayganx("submit", JOBS / "dcgan_celeba.yaml", *sets, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    ckpt = tmp / "runs" / "dcgan_celeba" / "checkpoint_000002"
    scores = []
    for workers in (1, 2):
        r = rayganx("eval", ckpt, "--metrics", "fid,kid", "--num-samples", "300", "--workers", str(workers),
                    "--json", tmp / f"ev{workers}.json", env=env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        scores.append(json.loads((tmp / f"ev{workers}.json").read_text()))
    assert scores[0]["fid"] == pytest.approx(scores[1]["fid"], rel=1e-4)
    assert scores[0]["kid"] == pytest.approx(scores[1]["kid"], rel=1e-3, abs=1e-6)
