"""Data and runs on object storage: a real S3-compatible server (moto) on loopback."""

import os

import boto3
import pytest
import torch
from PIL import Image

from rayganx import models, runner, spec as jobspec
from rayganx.runs import list_checkpoints, load_state, read_metrics
from rayganx.storage import Store
from tests.conftest import JOBS, TEST_KEY_ID, TEST_SECRET, rayganx, write_job

BUCKET = "s3://rayganx-test"


@pytest.fixture(scope="module")
def s3_run(ray_session, s3_server, tmp_path_factory):
    """Digits as Parquet on S3 (written by the CLI), a 2-worker run with its storage on S3."""
    tmp = tmp_path_factory.mktemp("s3")
    r = rayganx("data", "prepare", "digits", "--out", f"{BUCKET}/data/digits", "--format", "parquet",
                "--endpoint-url", s3_server)
    assert r.returncode == 0, r.stderr
    job = write_job(tmp / "s3job.yaml", "dcgan_digits.yaml", name="s3_digits",
                    data={"source": "parquet", "path": f"{BUCKET}/data/digits", "endpoint_url": s3_server},
                    storage={"path": f"{BUCKET}/runs", "endpoint_url": s3_server, "checkpoint_every": 2, "keep": 2},
                    train={"steps": 4, "log_every": 2}, samples={"every": 2, "n": 16})
    spec = jobspec.load(job)
    result = runner.run(spec)
    return {"spec": spec, "result": result, "job": job, "endpoint": s3_server, "tmp": tmp}


def test_training_from_and_to_s3(s3_run):
    spec, endpoint = s3_run["spec"], s3_run["endpoint"]
    run = Store(spec.run_url, endpoint)
    assert spec.scaling.num_workers == 2
    assert [c["step"] for c in list_checkpoints(run)] == [2, 4]
    assert run.exists("spec.yaml") and run.exists("samples", "step_000004.png")
    assert [m["step"] for m in read_metrics(run)] == [2, 4]
    assert s3_run["result"].checkpoints[-1]["url"] == f"{BUCKET}/runs/s3_digits/checkpoint_000004"


def test_cli_lists_pulls_samples_and_exports(s3_run):
    endpoint, tmp = s3_run["endpoint"], s3_run["tmp"]
    ep = ["--endpoint-url", endpoint]
    r = rayganx("runs", "list", f"{BUCKET}/runs", *ep)
    assert r.returncode == 0 and "s3_digits" in r.stdout and "dcgan" in r.stdout, r.stderr
    r = rayganx("checkpoints", "list", s3_run["job"])  # the run located from the job file
    assert r.returncode == 0 and "checkpoint_000002" in r.stdout and "checkpoint_000004" in r.stdout, r.stderr
    r = rayganx("checkpoints", "pull", f"{BUCKET}/runs/s3_digits", "--step", "2", "--to", tmp / "pulled", *ep)
    assert r.returncode == 0, r.stderr
    r = rayganx("checkpoints", "pull", f"{BUCKET}/runs/s3_digits", "--latest", "--to", tmp / "pulled", *ep)
    assert r.returncode == 0 and (tmp / "pulled" / "checkpoint_000004" / "state.pt").is_file(), r.stderr

    remote = f"{BUCKET}/runs/s3_digits/checkpoint_000004"
    for src, name in ((remote, "remote.png"), (tmp / "pulled" / "checkpoint_000004", "local.png")):
        r = rayganx("sample", src, "--n", "16", "--seed", "3", "--out", tmp / name, *ep)
        assert r.returncode == 0, r.stderr
    assert (tmp / "remote.png").read_bytes() == (tmp / "local.png").read_bytes()
    assert Image.open(tmp / "remote.png").size == (2 + 4 * 34, 2 + 4 * 34)

    r = rayganx("export", remote, "--out", tmp / "generator.pt", *ep)
    assert r.returncode == 0, r.stderr
    g, spec, _ = models.load_generator(str(tmp / "generator.pt"))  # plain torch + rayganx.models
    g_run, _, _ = models.generator_from_state(load_state(remote, endpoint))
    a, _ = models.sample_images(g, spec, None, 8, seed=5)
    b, _ = models.sample_images(g_run, spec, None, 8, seed=5)
    assert torch.equal(a, b)
    r = rayganx("sample", tmp / "generator.pt", "--n", "4", "--out-dir", tmp / "singles")
    assert r.returncode == 0 and len(list((tmp / "singles").glob("*.png"))) == 4


def test_resume_from_a_checkpoint_in_s3(s3_run):
    spec = jobspec.load(s3_run["job"], ["train.steps=6"])
    result = runner.run(spec)
    assert result.steps == 6
    assert [m["step"] for m in read_metrics(Store(spec.run_url, s3_run["endpoint"]))] == [2, 4, 6]
    state = load_state(f"{BUCKET}/runs/s3_digits/checkpoint_000006", s3_run["endpoint"])
    assert state["step"] == 6


def test_no_secret_in_storage_or_output(s3_run):
    s3 = boto3.client("s3", endpoint_url=s3_run["endpoint"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="rayganx-test", Prefix="runs/")["Contents"]]
    assert any(k.endswith("state.pt") for k in keys) and any(k.endswith("spec.yaml") for k in keys)
    for key in keys:
        body = s3.get_object(Bucket="rayganx-test", Key=key)["Body"].read()
        assert TEST_SECRET.encode() not in body and TEST_KEY_ID.encode() not in body, key
    r = rayganx("validate", s3_run["job"])
    r2 = rayganx("runs", "list", f"{BUCKET}/runs", "--endpoint-url", s3_run["endpoint"], "--verbose")
    for text in (r.stdout, r.stderr, r2.stdout, r2.stderr):
        assert TEST_SECRET not in text and TEST_KEY_ID not in text


def test_missing_bucket_and_unreachable_endpoint(s3_server, tmp_path):
    r = rayganx("runs", "list", "s3://no-such-bucket/runs", "--endpoint-url", s3_server)
    assert r.returncode == 1 and r.stderr.strip() == "error: s3://no-such-bucket/runs: does not exist"
    job = write_job(tmp_path / "j.yaml", "dcgan_digits.yaml",
                    storage={"path": "s3://no-such-bucket/runs", "endpoint_url": s3_server})
    r = rayganx("submit", job)
    assert r.returncode == 1 and r.stderr.strip() == "error: s3://no-such-bucket/runs: the bucket does not exist"
    r = rayganx("runs", "list", f"{BUCKET}/runs", "--endpoint-url", "http://127.0.0.1:9", timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {BUCKET}/runs: the storage endpoint is unreachable"


def test_wrong_credentials(s3_server, tmp_path, monkeypatch):
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks keys
    env = {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    r = rayganx("runs", "list", f"{BUCKET}/runs", "--endpoint-url", s3_server, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith(f"error: {BUCKET}/runs: access denied"), r.stderr
    assert "not-the-secret" not in r.stderr + r.stdout
    job = write_job(tmp_path / "j.yaml", "dcgan_digits.yaml",
                    storage={"path": f"{BUCKET}/runs", "endpoint_url": s3_server})
    r = rayganx("submit", job, env=env)
    assert r.returncode == 1 and r.stderr.strip().startswith(f"error: {BUCKET}/runs: access denied"), r.stderr


def test_native_pyarrow_filesystem_per_scheme(s3_server, tmp_path):
    import pickle

    import pyarrow.fs as pafs

    from rayganx.storage import pyarrow_filesystem, ray_storage

    s3 = pyarrow_filesystem(f"{BUCKET}/native", s3_server)
    assert isinstance(s3, pafs.S3FileSystem)  # pyarrow's C++ client, not the fsspec shim
    assert isinstance(pyarrow_filesystem("gs://bucket/x"), pafs.GcsFileSystem)
    assert isinstance(pyarrow_filesystem(str(tmp_path)), pafs.LocalFileSystem)
    assert isinstance(pyarrow_filesystem("memory://x"), pafs.PyFileSystem)  # other schemes: fsspec
    assert TEST_SECRET.encode() not in pickle.dumps(s3)  # workers get it pickled: no credentials inside
    with s3.open_output_stream("rayganx-test/native/a.txt") as f:
        f.write(b"through pyarrow")
    assert Store(f"{BUCKET}/native", s3_server).read_text("a.txt") == "through pyarrow"
    args = ray_storage(f"{BUCKET}/runs", s3_server)
    assert args["storage_path"] == "rayganx-test/runs" and isinstance(args["storage_filesystem"], pafs.S3FileSystem)
    assert ray_storage("runs") == {"storage_path": os.path.abspath("runs")}
