"""`rayganx submit` end to end, in a fresh process with its own embedded Ray, as a user runs it."""

import pytest
from PIL import Image

from tests.conftest import JOBS, rayganx


@pytest.mark.slow
def test_submit_digits_end_to_end(tmp_path):
    r = rayganx("submit", JOBS / "dcgan_digits.yaml", "--set", "train.steps=6", "--set", "train.log_every=2",
                "--set", f"storage.path={tmp_path}", "--set", "storage.checkpoint_every=3",
                "--set", "samples.every=3", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 6/6" in r.stdout and "loss_d" in r.stdout  # progress lines (not a terminal here)
    assert "checkpoint_000006" in r.stdout and "samples" in r.stdout  # the closing summary
    assert "Traceback" not in r.stderr and "WARNING" not in r.stderr
    run = tmp_path / "dcgan_digits"
    assert (run / "checkpoint_000003" / "state.pt").is_file() and (run / "checkpoint_000006" / "state.pt").is_file()
    assert Image.open(run / "samples" / "step_000006.png").size[0] > 64
    assert (run / "spec.yaml").is_file() and list((run / "metrics").glob("part_*.jsonl"))


def test_submit_failure_is_one_line_and_nonzero(tmp_path):
    r = rayganx("submit", JOBS / "dcgan_celeba.yaml", "--set", f"data.path={tmp_path}/no_celeba",
                "--set", f"storage.path={tmp_path}/runs")
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: data.path: {tmp_path}/no_celeba does not exist"


@pytest.mark.slow
def test_gpu_job_on_a_cpu_machine_fails_fast(tmp_path):
    r = rayganx("submit", JOBS / "dcgan_digits.yaml", "--set", "scaling.use_gpu=true",
                "--set", f"storage.path={tmp_path}", timeout=120)
    assert r.returncode == 1 and "scaling.use_gpu" in r.stderr and "has 0" in r.stderr
