"""TensorBoard event files, `rayganx tb`, `runs compare/show` and the Grafana dashboard, on two
short real runs: one on local disk (2 DDP workers), one on a moto S3 server."""

import io
import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from PIL import Image

from rayganx.ops import grafana
from rayganx.training import runner
from rayganx.job import spec as jobspec
from rayganx.store.runs import read_metrics
from rayganx.store.storage import Store
from rayganx.store.tracking import sync_events
from tests.conftest import ROOT, rayganx, tiny, write_job

SMALL = {"ngf": 16, "ndf": 16}


def accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def two_runs(ray_session, s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mon")
    local = write_job(tmp / "a.yaml", "dcgan_digits.yaml",
                      **tiny("cmp_a", tmp / "runs", steps=6, model=SMALL,
                             train={"batch_size": 32, "optim_g": {"lr": 2e-4}}))
    remote = write_job(tmp / "b.yaml", "dcgan_digits.yaml",
                       **tiny("cmp_b", tmp, steps=6, model=SMALL, scaling={"num_workers": 1},
                              train={"batch_size": 32, "optim_g": {"lr": 1e-4}}))
    a = jobspec.load(local, ["samples.every=3"])
    b = jobspec.load(remote, ["samples.every=3", "storage.path=s3://rayganx-test/mon",
                              f"storage.endpoint_url={s3_server}"])
    runner.run(a)
    runner.run(b)
    return {"a": a, "b": b, "endpoint": s3_server, "tmp": tmp}


def test_event_files_hold_scalars_images_and_the_spec(two_runs):
    tmp = two_runs["tmp"]
    b = two_runs["b"]
    copied = tmp / "b_tb"
    assert sync_events(Store(b.run_url, b.storage.endpoint_url), str(copied)) >= 2  # a file per flush point
    assert sync_events(Store(b.run_url, b.storage.endpoint_url), str(copied)) == 0  # incremental
    for spec, folder in ((two_runs["a"], os.path.join(two_runs["a"].run_url, "tb")), (b, copied)):
        assert all("tfevents" in n for n in os.listdir(folder)), os.listdir(folder)  # no temp files left
        ea = accumulator(folder)
        rows = read_metrics(Store(spec.run_url, spec.storage.endpoint_url))
        assert [r["step"] for r in rows] == [2, 3, 4, 6]  # log steps, and the checkpoint/sample step 3
        for key in ("loss_d", "loss_g", "images_per_s", "step_time", "d_real"):
            # event files hold float32: equal to the logged float64 to float32's precision
            assert [(s.step, pytest.approx(s.value, rel=1e-6)) for s in ea.Scalars(key)] == \
                [(r["step"], r[key]) for r in rows], key
        lr = ea.Scalars("lr_g")
        assert lr[-1].value == pytest.approx(spec.train.optim_g.lr)
        images = ea.Images("samples")
        assert [i.step for i in images] == [3, 6]
        grid = Store(spec.run_url, spec.storage.endpoint_url).read_bytes("samples", "step_000006.png")
        assert images[-1].encoded_image_string == grid  # the grid itself, not a re-encoding
        assert Image.open(io.BytesIO(grid)).size == (images[-1].width, images[-1].height)
        text = ea.Tensors("spec/text_summary")[0].tensor_proto.string_val[0].decode()
        assert f"name: {spec.name}" in text and "lr: " in text
        assert "step" not in ea.Tags()["scalars"] and "time" not in ea.Tags()["scalars"]


def test_runs_compare_and_show_local_and_s3(two_runs):
    tmp, ep = two_runs["tmp"], ["--endpoint-url", two_runs["endpoint"]]
    png = tmp / "compare.png"
    r = rayganx("runs", "compare", two_runs["a"].run_url, two_runs["b"].run_url, "--out", png, *ep)
    assert r.returncode == 0, r.stderr
    assert "cmp_a" in r.stdout and "cmp_b" in r.stdout and "s3://rayganx-test/mon/cmp_b" in r.stdout
    diff_rows = {line.split("│")[1].strip() for line in r.stdout.splitlines() if line.count("│") >= 3}
    assert {"train.optim_g.lr", "scaling.num_workers", "storage.path", "storage.endpoint_url"} <= diff_rows, r.stdout
    assert "model.ngf" not in diff_rows and "loss_d" in diff_rows and "images_per_s" in diff_rows
    assert Image.open(png).size == (1200, 800)

    r = rayganx("runs", "show", two_runs["b"].run_url, "--out", tmp / "show.png", *ep)
    assert r.returncode == 0, r.stderr
    assert "model.ngf" in r.stdout and "checkpoints" in r.stdout and "loss_g" in r.stdout
    assert Image.open(tmp / "show.png").size == (1200, 800)

    r = rayganx("runs", "compare", str(tmp / "nowhere"), two_runs["a"].run_url)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no rayganx run there" in r.stderr


def test_tb_serves_local_and_synced_s3_runs(two_runs):
    from tests.test_remote import free_port

    tmp = two_runs["tmp"]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rayganx.cli", "tb", two_runs["a"].run_url, two_runs["b"].run_url,
                             "--port", str(port), "--cache", str(tmp / "cache"), "--endpoint-url",
                             two_runs["endpoint"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "TensorBoard at" in line:
                break
        assert f"TensorBoard at http://127.0.0.1:{port}/" in "".join(lines), "".join(lines) + proc.stderr.read()
        assert "synced" in lines[0]
        assert b"TensorBoard" in urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        runs = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=10).read())
        assert sorted(runs) == ["cmp_a/tb", "cmp_b/tb"], runs
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)  # TensorBoard's own shutdown takes a while on a busy machine
    assert proc.returncode == 0
    assert any(n.startswith("events.out.tfevents.") for n in os.listdir(tmp / "cache" / "rayganx-test" / "mon" /
                                                                       "cmp_b" / "tb"))


def test_grafana_dashboard_json_queries_the_exported_metrics():
    r = rayganx("grafana-dashboard")
    assert r.returncode == 0, r.stderr
    board = json.loads(r.stdout)
    assert board == grafana.dashboard()
    titles = [p["title"] for p in board["panels"]]
    assert titles == ["Losses", "Images/s", "Step time", "Step", "FID / KID", "Checkpoint age", "Rollbacks"]
    from rayganx.store.tracking import Telemetry

    queried = grafana.queried_metrics(board)
    # Every metric a panel queries is one the workers export (Ray adds the ray_ prefix).
    assert set(queried) <= {f"ray_rayganx_{k}" for k in Telemetry.EXPORTED}
    assert {"ray_rayganx_rollbacks", "ray_rayganx_last_checkpoint_time", "ray_rayganx_fid"} <= set(queried)
    assert all({"job", "rank", "SessionName"} <= labels for name, labels in queried.items()
               if name != "ray_rayganx_step")
