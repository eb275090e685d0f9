"""The Jobs API against a real head node started with `ray start --head` on 127.0.0.1."""

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tests.cluster import free_port
from tests.conftest import JOBS, rayganx


@pytest.fixture(scope="module")
def head(ray_head):
    """The session's Ray head (token auth as Ray sets it), through its Jobs API."""
    return {"address": ray_head.dashboard, "metrics": f"http://127.0.0.1:{ray_head.metrics_port}/metrics"}


def test_submit_follow_logs_list_and_status(head, s3_server, tmp_path):
    """The job is resolved once, here: --set values (an s3:// data path among them) reach the
    cluster as given, and nothing of the dataset travels with the job."""
    from rayganx.data.prepare import prepare_digits
    from rayganx.store.storage import Store

    prepare_digits("s3://rayganx-test/remote/digits", "parquet", 32, s3_server)
    addr = head["address"]
    r = rayganx("submit", JOBS / "dcgan_digits.yaml", "--address", addr, "--follow", "--set", "train.steps=4",
                "--set", "train.log_every=2", "--set", "data.source=parquet",
                "--set", "data.path=s3://rayganx-test/remote/digits", "--set", f"data.endpoint_url={s3_server}",
                "--set", "storage.path=s3://rayganx-test/remote/runs", "--set", f"storage.endpoint_url={s3_server}",
                timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.split("submitted ", 1)[1].split()[0]
    assert job_id.startswith("dcgan_digits-") and f"{job_id}: SUCCEEDED" in r.stdout
    assert "step 4/4" in r.stdout
    run = Store("s3://rayganx-test/remote/runs/dcgan_digits", s3_server)
    ran = yaml.safe_load(run.read_text("spec.yaml"))  # what the cluster ran, as it wrote it
    assert ran["data"]["path"] == "s3://rayganx-test/remote/digits" and ran["data"]["source"] == "parquet"
    assert ran["train"]["steps"] == 4 and run.exists("checkpoint_000004")
    # What the dashboard's job page shows, read back through the Jobs API.
    from rayganx.ops import remote

    meta = remote.info(addr, job_id).metadata
    assert {k: meta[k] for k in ("job_name", "model", "data", "run")} == {
        "job_name": "dcgan_digits", "model": "dcgan", "data": "parquet s3://rayganx-test/remote/digits",
        "run": "s3://rayganx-test/remote/runs/dcgan_digits"}

    r = rayganx("logs", job_id, "--address", addr)
    assert r.returncode == 0 and "step 2/4 | loss_d" in r.stdout
    r = rayganx("status", job_id, "--address", addr)
    assert r.returncode == 0 and r.stdout.strip().startswith(f"{job_id}: SUCCEEDED")
    r = rayganx("list", "--address", addr)
    assert r.returncode == 0 and job_id in r.stdout and "SUCCEEDED" in r.stdout and "dcgan_digits" in r.stdout


def test_local_data_and_storage_are_refused_before_anything_is_sent(tmp_path):
    unreachable = f"http://127.0.0.1:{free_port()}"  # refused before any connection is tried
    r = rayganx("submit", JOBS / "dcgan_celeba.yaml", "--address", unreachable, env={"CELEBA_PARQUET": str(tmp_path)})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith(f"error: data.path: '{tmp_path}' is a path on this machine, which the cluster "
                               "cannot read; put it in object storage") and "--paths-on-cluster" in lines[0]
    assert lines[1].startswith("error: storage.path: 'runs' is a path on this machine")
    # Saying the paths exist on the cluster still refuses a relative one: it would land in the
    # job's temporary working directory on the head.
    r = rayganx("submit", JOBS / "dcgan_digits.yaml", "--address", unreachable, "--paths-on-cluster")
    assert r.returncode == 1 and "storage.path: 'runs' is relative" in r.stderr
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "job": str(JOBS / "dcgan_digits.yaml"),
                                     "metric": "loss_d", "space": {"train.optim_g.lr": {"grid": [1e-4, 2e-4]}},
                                     "search": "grid"}))
    r = rayganx("tune", sweep, "--address", unreachable)
    assert r.returncode == 1 and "storage.path: 'runs' is a path on this machine" in r.stderr, r.stderr


def _rayganx_metrics(url: str) -> tuple[dict[str, float], dict[str, set[str]]]:
    """The long_digits series on a node's endpoint: {metric: value} and {metric: its label names}."""
    import re

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out, labels = {}, {}
    for line in text.splitlines():
        if line.startswith("ray_rayganx_") and 'job="long_digits"' in line:
            name = line.split("{", 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
            labels.setdefault(name, set()).update(re.findall(r'(\w+)="', line.split("{", 1)[1].rsplit("}", 1)[0]))
    return out, labels


def test_metrics_on_prometheus_endpoint_then_stop(head, tmp_path):
    """Every metric the Grafana dashboard's panels query is exported with the labels they use."""
    from rayganx.ops import grafana

    addr = head["address"]
    r = rayganx("submit", JOBS / "dcgan_digits.yaml", "--address", addr, "--set", "name=long_digits",
                "--set", "train.steps=100000", "--set", "train.log_every=5", "--set", f"storage.path={tmp_path}",
                "--set", "storage.checkpoint_every=5", "--set", "eval.every=5", "--set", "eval.num_samples=64",
                "--set", "model.ngf=16", "--set", "model.ndf=16", "--set", "train.batch_size=32",
                "--paths-on-cluster")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.split("submitted ", 1)[1].split()[0]
    panels = grafana.queried_metrics(model_kind="dcgan")
    assert len(panels) == 9  # all but the CNN/VAE loss
    seen: dict[str, float] = {}
    labels: dict[str, set[str]] = {}
    deadline = time.time() + 240
    while time.time() < deadline and not set(panels) <= set(seen):
        time.sleep(3)
        try:
            seen, labels = _rayganx_metrics(head["metrics"])
        except OSError:
            pass
    assert set(panels) <= set(seen), f"not exported: {set(panels) - set(seen)}"
    for name, used in panels.items():
        assert used <= labels[name], f"{name}: the dashboard filters by {used - labels[name]}, not exported"
    assert seen.get("ray_rayganx_step", 0) >= 5, seen
    assert 0 < seen["ray_rayganx_loss_d"] < 20 and seen["ray_rayganx_images_per_s"] > 1
    assert seen["ray_rayganx_fid"] > 0 and seen["ray_rayganx_rollbacks"] == 0 and seen["ray_rayganx_step_time"] > 0
    assert 0 <= time.time() - seen["ray_rayganx_last_checkpoint_time"] < 120

    r = rayganx("stop", job_id, "--address", addr)
    assert r.returncode == 0, r.stderr
    for _ in range(60):
        r = rayganx("status", job_id, "--address", addr)
        if "STOPPED" in r.stdout:
            break
        time.sleep(1)
    assert r.stdout.strip().startswith(f"{job_id}: STOPPED"), r.stdout


def test_unknown_job_id(head):
    r = rayganx("status", "no-such-job-123", "--address", head["address"])
    assert r.returncode == 1 and "no job no-such-job-123" in r.stderr and "Traceback" not in r.stderr


def test_token_errors_and_unreachable(head, tmp_path):
    no_token = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": "", "RAY_AUTH_MODE": ""}
    r = rayganx("list", "--address", head["address"], env=no_token)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {head['address']}: the cluster requires an auth token; set RAY_AUTH_TOKEN " \
                               "or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token"
    r = rayganx("list", "--address", head["address"], env={**no_token, "RAY_AUTH_TOKEN": "wrong-token"})
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {head['address']}: the cluster rejected the auth token from RAY_AUTH_TOKEN"
    r = rayganx("list", "--address", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "cannot reach the Ray Jobs API" in r.stderr and "Traceback" not in r.stderr


def test_address_that_is_not_a_ray_cluster(tmp_path):
    port = free_port()
    server = subprocess.Popen(["python", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        r = rayganx("list", "--address", f"http://127.0.0.1:{port}")
        assert r.returncode == 1 and "does not serve the Ray Jobs API" in r.stderr, r.stderr
    finally:
        server.kill()


def test_tune_sweep_through_the_jobs_api(head, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "remote_sweep", "job": str(JOBS / "dcgan_digits.yaml"), "storage": str(tmp_path / "sweeps"),
        "metric": "loss_d", "search": "grid", "num_samples": 1, "report_every": 2,
        "space": {"scaling.num_workers": 1, "train.batch_size": 32, "train.log_every": 2,
                  "train.optim_g.lr": {"grid": [1e-4, 2e-4]}},
        "scheduler": {"kind": "fifo", "max_steps": 4}}))
    r = rayganx("tune", sweep, "--address", head["address"], "--follow", "--paths-on-cluster", timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.split("submitted ", 1)[1].split()[0]
    assert job_id.startswith("remote_sweep-") and f"{job_id}: SUCCEEDED" in r.stdout
    assert "leaderboard: remote_sweep by loss_d (min)" in r.stdout
    board = json.loads((tmp_path / "sweeps" / "remote_sweep" / "leaderboard.json").read_text())
    assert sorted(t["config"]["train.optim_g.lr"] for t in board["trials"]) == [1e-4, 2e-4]
    assert all(t["status"] == "finished" and t["step"] == 4 for t in board["trials"])
