"""`rayganx submit` end to end, in a fresh process with its own embedded Ray, as a user runs it."""

import os

import pytest
from PIL import Image

from tests.conftest import JOBS, rayganx


@pytest.mark.slow
def test_submit_digits_end_to_end_with_a_second_embedded_run_beside_it(tmp_path):
    # Two `rayganx submit` started at once on one machine, each with its own embedded Ray: both work.
    import subprocess
    import sys

    from tests.conftest import ROOT

    def submit(name, *extra):
        return subprocess.Popen(
            [sys.executable, "-m", "rayganx.cli", "submit", str(JOBS / "dcgan_digits.yaml"), "--set", f"name={name}",
             "--set", "train.steps=6", "--set", "train.log_every=2", "--set", f"storage.path={tmp_path}",
             "--set", "storage.checkpoint_every=3", "--set", "samples.every=3", *extra],
            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    procs = [submit("dcgan_digits"), submit("beside", "--set", "scaling.num_workers=1", "--set", "model.ngf=8")]
    (out, err), (out2, err2) = (p.communicate(timeout=400) for p in procs)
    assert procs[1].returncode == 0, out2 + err2
    assert procs[0].returncode == 0, out + err
    assert "step 6/6" in out and "loss_d" in out  # progress lines (not a terminal here)
    assert "checkpoint_000006" in out and "samples" in out  # the closing summary
    assert "Traceback" not in err and "WARNING" not in err
    run = tmp_path / "dcgan_digits"
    assert (run / "checkpoint_000003" / "state.pt").is_file() and (run / "checkpoint_000006" / "state.pt").is_file()
    assert Image.open(run / "samples" / "step_000006.png").size[0] > 64
    assert (run / "spec.yaml").is_file() and list((run / "metrics").glob("part_*.jsonl"))
    assert (tmp_path / "beside" / "checkpoint_000006" / "state.pt").is_file()


def test_submit_failure_is_one_line_and_nonzero(tmp_path):
    r = rayganx("submit", JOBS / "dcgan_celeba.yaml", "--set", f"data.path={tmp_path}/no_celeba",
                "--set", f"storage.path={tmp_path}/runs")
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: data.path: {tmp_path}/no_celeba does not exist"


def test_the_tests_forked_cli_answers_as_a_fresh_interpreter_does(tmp_path):
    # The suite's CLI calls fork from a process that imported torch (tests/forked_cli.py): the same
    # calls as a fresh `python -m rayganx.cli` give the same status, stdout and stderr.
    import subprocess
    import sys

    from tests.conftest import ROOT

    calls = [("validate", JOBS / "dcgan_digits.yaml", "--set", "train.steps=7"),
             ("submit", JOBS / "dcgan_celeba.yaml", "--set", f"data.path={tmp_path}/no_celeba"),
             ("runs", "list", tmp_path / "none"), ("no-such-command",)]
    for args in calls:
        forked = rayganx(*args, env={"COLUMNS": "150"})
        fresh = subprocess.run([sys.executable, "-m", "rayganx.cli", *map(str, args)], capture_output=True, text=True,
                               cwd=ROOT, env={**os.environ, "COLUMNS": "150"})
        # click names the program as it was started: `rayganx` is the installed script's name
        fresh_err = fresh.stderr.replace("python -m rayganx.cli", "rayganx")
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh_err), args
    assert "Usage: rayganx [OPTIONS]" in forked.stderr and forked.returncode == 2


@pytest.mark.slow
def test_a_job_asking_for_more_gpus_than_the_machine_has_fails_fast(tmp_path):
    import torch

    have = torch.cuda.device_count()
    r = rayganx("submit", JOBS / "dcgan_digits.yaml", "--set", "scaling.use_gpu=true",
                "--set", "scaling.gpus_per_worker=64", "--set", f"storage.path={tmp_path}", timeout=120)
    assert r.returncode == 1 and "scaling.use_gpu: 2 workers x 64 GPU requested" in r.stderr, r.stderr
    assert f"this machine has {have}" in r.stderr
