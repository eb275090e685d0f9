"""Data and runs on object storage: a real S3-compatible server (moto) on loopback."""

import os

import boto3
import pytest
import torch
from PIL import Image

from rayganx.models import trained
from rayganx.training import runner
from rayganx.job import spec as jobspec
from rayganx.store.runs import list_checkpoints, load_state, read_metrics
from rayganx.store.storage import Store
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
    g, spec, _ = trained.load_generator(str(tmp / "generator.pt"))  # plain torch + rayganx.models.networks
    g_run, _, _ = trained.generator_from_state(load_state(remote, endpoint))
    a, _ = trained.sample_images(g, spec, None, 8, seed=5)
    b, _ = trained.sample_images(g_run, spec, None, 8, seed=5)
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

    from rayganx.store.pyarrow_fs import pyarrow_filesystem, ray_storage

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


# --------------------------------------------------------------------------- a store shared with others


def _copy_prefix(s3, src: str, dst: str) -> None:
    for o in s3.list_objects_v2(Bucket="rayganx-test", Prefix=src)["Contents"]:
        s3.copy_object(Bucket="rayganx-test", Key=dst + o["Key"][len(src):],
                       CopySource={"Bucket": "rayganx-test", "Key": o["Key"]})


CRAFTED = ["../../../escaped.txt", "/abs/escaped.txt", "sub/../../escaped.txt", "a/./b.txt"]


@pytest.mark.parametrize("crafted", CRAFTED)
def test_crafted_keys_in_a_shared_bucket_write_nothing_outside_the_destination(s3_run, tmp_path, crafted):
    s3 = boto3.client("s3", endpoint_url=s3_run["endpoint"])
    base = "runs/crafted/checkpoint_000004"
    _copy_prefix(s3, "runs/s3_digits/checkpoint_000004/", base + "/")  # a copy: the shared run stays as it is
    s3.put_object(Bucket="rayganx-test", Key=f"{base}/{crafted}", Body=b"planted")
    ep = ["--endpoint-url", s3_run["endpoint"]]
    dest = tmp_path / "a" / "b" / "c" / "to"
    url = f"{BUCKET}/{base}"
    for args in (("checkpoints", "pull", f"{BUCKET}/runs/crafted", "--latest", "--to", dest),
                 ("sample", url, "--out", dest / "x.png"), ("export", url, "--out", dest / "g.pt")):
        r = rayganx(*args, *ep)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (args[0], r.stderr)
        assert "refused" in r.stderr or "no checkpoints" in r.stderr or "incomplete" in r.stderr, r.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written anywhere under tmp_path
    # image completion's outputs are named from its inputs' keys: a crafted one is refused, whole
    inputs = "data/crafted_inputs"
    s3.put_object(Bucket="rayganx-test", Key=f"{inputs}/ok.png", Body=_png())
    s3.put_object(Bucket="rayganx-test", Key=f"{inputs}/{crafted.rstrip('.txt')}.png", Body=_png())
    r = rayganx("complete", url.replace("crafted", "s3_digits"), "--input", f"{BUCKET}/{inputs}", "--mask", "center",
                "--method", "mean", "--out", dest, *ep)
    assert r.returncode == 1 and "refused the key" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    s3.delete_object(Bucket="rayganx-test", Key=f"{inputs}/{crafted.rstrip('.txt')}.png")


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("L", (32, 32), 128).save(buf, format="PNG")
    return buf.getvalue()


def test_concurrent_probes_of_one_bucket_never_fail_each_other(s3_server):
    import threading

    failures = []

    def probe():
        try:
            for _ in range(5):
                Store(f"{BUCKET}/probes", s3_server).check_writable()
        except Exception as e:  # noqa: BLE001
            failures.append(e)

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_local_stores_write_files_others_can_read(tmp_path):
    old = os.umask(0o022)
    try:
        import importlib

        import rayganx.store.storage as storage

        importlib.reload(storage)  # the umask is read once, at import
        storage.Store(str(tmp_path)).write_text("x", "run", "spec.yaml")
        storage.Store(str(tmp_path)).create(b"x", "run", "metrics", "part_000000.jsonl")
    finally:
        os.umask(old)
    assert (tmp_path / "run" / "spec.yaml").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run" / "metrics" / "part_000000.jsonl").stat().st_mode & 0o777 == 0o644


def test_a_tuner_pkl_planted_in_a_sweep_on_object_storage_does_not_run(s3_server, tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket="rayganx-test", Key="sweeps/planted/tune/tuner.pkl", Body=pickle.dumps(Payload()))
    job = tmp_path / "job.yaml"
    job.write_text((JOBS / "dcgan_digits.yaml").read_text().replace("path: runs", f"path: runs\n  endpoint_url: {s3_server}"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: planted\njob: {job}\nstorage: s3://rayganx-test/sweeps\nmetric: loss_d\n"
                     "space: {train.optim_g.lr: {grid: [0.0001, 0.0002]}}\nsearch: grid\n")
    r = rayganx("tune", sweep, "--resume")
    assert r.returncode == 1 and "--trust-sweep-state" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "pwned").exists()


class Outage:
    """A moto server of its own on a fixed port, stopped and started again like a store's bad
    minutes (moto keeps its objects in-process, so they are still there afterwards)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        from tests.cluster import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self.server.start()
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket="outage")

    def stop(self):
        self.server.stop()

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self.server.start()


def test_a_store_outage_shorter_than_the_tolerance_loses_nothing_a_longer_one_ends_the_run_cleanly(
        ray_session, tmp_path):
    import threading
    import time

    store = Outage()
    job = write_job(tmp_path / "o.yaml", "dcgan_digits.yaml", name="outage",
                    storage={"path": "s3://outage/runs", "endpoint_url": store.endpoint, "checkpoint_every": 10,
                             "keep": 10},
                    model={"ngf": 8, "ndf": 8}, train={"batch_size": 32, "log_every": 2}, samples={"every": 10, "n": 4},
                    scaling={"num_workers": 1})
    down = {}

    def printer(m):  # 10 s without the store from step 12 on, the run going on meanwhile
        if m["step"] >= 12 and not down:
            store.stop()
            down["at"] = time.monotonic()
            threading.Timer(10, store.start).start()

    try:
        result = runner.run(jobspec.load(job, ["train.steps=60", "storage.outage_tolerance_s=120"]), printer=printer)
        assert result.steps == 60 and down
        run = Store("s3://outage/runs/outage", store.endpoint)
        assert [m["step"] for m in read_metrics(run) if "event" not in m] == list(range(2, 61, 2))  # every row
        ckpts = list_checkpoints(run)
        assert [c["step"] for c in ckpts] == [10, 20, 30, 40, 50, 60]  # none lost, every one complete
        for c in ckpts:
            assert load_state(c["url"], store.endpoint)["step"] == c["step"]
        assert run.exists("samples", "step_000020.png")  # a grid made during the outage arrived too

        # Longer than the tolerance: a clear end, the last complete checkpoint intact, and the next
        # submit resumes once the store is back.
        stopped = {}

        def printer2(m):
            if m["step"] >= 64 and not stopped:
                store.stop()
                stopped["at"] = time.monotonic()

        with pytest.raises(runner.RunError) as err:
            runner.run(jobspec.load(job, ["train.steps=100000", "storage.outage_tolerance_s=4"]), printer=printer2)
        took = time.monotonic() - stopped["at"]
        message = str(err.value)
        assert "unreachable" in message and len(message.splitlines()) == 1, message
        assert took < 120, took
        print(f"FIGURE store-outage: ended {took:.1f} s after the store stopped for good: {message}")
        store.start()
        last = list_checkpoints(run)[-1]
        assert last["step"] >= 60 and load_state(last["url"], store.endpoint)["step"] == last["step"]
        more = runner.run(jobspec.load(job, [f"train.steps={last['step'] + 4}", "storage.outage_tolerance_s=120"]),
                          allow_changes=True)  # fewer steps than the 100000 of the cut-off attempt
        assert more.steps == last["step"] + 4
    finally:
        store.stop()


def test_slow_uploads_keep_host_memory_bounded(ray_session, tmp_path, monkeypatch):
    # A store much slower than the checkpoints: training waits for the upload before the next one
    # instead of queueing a copy of the state per checkpoint (about 40 MB each here).
    monkeypatch.setenv("RAYGANX_FAULT_SLOW_UPLOAD_S", "1.5")
    job = write_job(tmp_path / "slow.yaml", "dcgan_digits.yaml", name="slow",
                    storage={"path": str(tmp_path / "runs"), "checkpoint_every": 1, "keep": 1},
                    model={"ngf": 64, "ndf": 64}, train={"batch_size": 8, "log_every": 1, "steps": 14},
                    samples={"every": 1000}, scaling={"num_workers": 1})
    result = runner.run(jobspec.load(job))
    assert result.steps == 14
    rss = [m["peak_rss_mb"] for m in read_metrics(Store(str(tmp_path / "runs" / "slow"))) if "event" not in m]
    # 14 checkpoints of ~40 MB each queued behind 1.5 s uploads would add ~400 MB; bounded, it stays flat.
    assert rss[-1] - rss[4] < 150, rss


def test_two_submits_at_once_one_trains_and_a_forced_takeover_stops_the_first(on_head, tmp_path):
    import json
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    job = write_job(tmp_path / "same.yaml", "dcgan_digits.yaml", name="same",
                    storage={"path": str(tmp_path / "runs"), "checkpoint_every": 4},
                    model={"ngf": 8, "ndf": 8}, train={"batch_size": 32, "log_every": 2, "steps": 8},
                    samples={"every": 1000}, scaling={"num_workers": 1})
    env = {**os.environ, **on_head, "RAYGANX_LOCK_HEARTBEAT_S": "1"}

    def submit(*extra):
        return subprocess.Popen([sys.executable, "-m", "rayganx.cli", "submit", str(job), *extra], cwd=ROOT,
                                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    a, b = submit(), submit()  # together
    outs = [p.communicate(timeout=300) for p in (a, b)]
    codes = sorted(p.returncode for p in (a, b))
    assert codes == [0, 1], outs
    refused = outs[[a.returncode, b.returncode].index(1)][1]
    assert "in use by" in refused and len(refused.strip().splitlines()) == 1, refused

    # A long run, then a forced takeover: the first stops writing within two heartbeats (1 s here).
    first = submit("--set", "train.steps=100000", "--allow-changes")
    run = tmp_path / "runs" / "same"
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "metrics").glob("part_*")) or \
            len(list((run / "metrics").glob("part_*"))) < 3:
        time.sleep(0.5)
    second = submit("--force", "--set", "train.steps=100000", "--set", "storage.checkpoint_every=1000",
                    "--allow-changes")
    t0 = time.monotonic()
    out, err = first.communicate(timeout=120)
    took = time.monotonic() - t0
    assert first.returncode == 1 and "taken over" in err, err
    assert took < 60, took  # the takeover itself, then at most two heartbeats (plus Ray's stop)
    parts_at_stop = {p.name: p.read_bytes() for p in (run / "metrics").glob("part_*")}
    time.sleep(3)
    second.terminate()
    second.communicate(timeout=60)
    writers = {p.split("_")[2].split(".")[0] for p in parts_at_stop}
    assert len(writers) == 2, parts_at_stop.keys()  # both runs' parts, each named by its writer
    for name in parts_at_stop:  # every part whole, and the first's left as they were after it stopped
        body = (run / "metrics" / name).read_bytes()
        assert body == parts_at_stop[name] and all(json.loads(line) for line in body.decode().splitlines())
