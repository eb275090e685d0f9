"""`rayganx bench` end to end with tiny settings: every field present and sane (no timing thresholds)."""

import json

import pytest

from tests.conftest import JOBS, rayganx


@pytest.mark.slow
def test_bench_json_has_every_field(tmp_path, on_head):
    out = tmp_path / "bench.json"
    r = rayganx("bench", JOBS / "dcgan_digits.yaml", "--steps", "8", "--warmup", "2", "--workers", "1",
                "--json", out, "--set", "model.ngf=8", "--set", "model.ndf=8", env=on_head, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "plain PyTorch" in r.stdout and "input only" in r.stdout
    res = json.loads(out.read_text())
    assert res["plain"]["images_per_s"] > 0 and res["plain"]["flops_per_step"] > 0
    assert 0 < res["plain"]["flop_utilisation"] < 2
    assert [row["workers"] for row in res["rayganx"]] == [1]  # more workers: test_cli, test_train
    for row in res["rayganx"]:
        assert row["images_per_s"] > 0 and 0 < row["ratio_to_plain"] < 2
        assert 0 < row["scaling_efficiency"] < 2 and 0 < row["flop_utilisation"] < 2
        assert row["step_time"]["min"] <= row["step_time"]["median"] <= row["step_time"]["max"]
        assert 0 < row["time_to_first_step"] < 300 and row["peak_rss_mb_per_worker"] > 50
    assert res["input_only"]["images_per_s"] > 0 and res["input_only"]["multiple_of_consumption"] > 0
    assert res["bare_trainer_startup_s"] > 0 and res["machine"]["matmul_flops_per_s"] > 1e8


def test_bench_makes_stand_in_images_when_the_dataset_is_absent(tmp_path):
    from rayganx.job import spec as jobspec
    from rayganx.training.bench import stand_in_data

    from rayganx.data.sources import count_rows

    spec = jobspec.load(JOBS / "dcgan_celeba.yaml", [f"data.path={tmp_path}/none"])  # prepared Parquet
    s = stand_in_data(spec, str(tmp_path / "standin"), n=4)
    assert count_rows(s.data) == 4 and s.data.source == "parquet"
    folder = jobspec.load(JOBS / "dcgan_celeba.yaml", ["data.source=celeba", f"data.path={tmp_path}/none"])
    s = stand_in_data(folder, str(tmp_path / "jpegs"), n=4)  # the unzipped archive's layout
    assert count_rows(s.data) == 4 and s.data.source == "celeba"


@pytest.mark.parametrize("sets", [["train.channels_last=true"],
                                  pytest.param(["train.compile=true"], marks=pytest.mark.slow)])  # compiling: 30 s
def test_plain_row_runs_on_the_job_device_with_its_options(sets):
    import torch

    from rayganx.job import spec as jobspec
    from rayganx.training.bench import plain

    kind = ["model.kind=mlp_gan", "data.source=gaussian_mixture"] if "train.compile=true" in sets else []
    spec = jobspec.load(JOBS / "dcgan_digits.yaml", ["model.ngf=8", "model.ndf=8", "train.batch_size=16",
                                                     "scaling.use_gpu=true", "scaling.num_workers=1", *kind, *sets])
    res = plain(spec, steps=3, warmup=1)
    assert res["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert res["channels_last"] == ("train.channels_last=true" in sets)
    assert res["compile"] == ("train.compile=true" in sets)
    assert res["images_per_s"] > 0 and res["flops_per_step"] > 0


def test_plain_row_of_a_job_with_r1_times_it_without_a_flop_count():
    """torch's FLOP counter cannot follow autograd.grad (R1, gradient penalty): the row still times
    the step and says the count is unknown instead of failing the command."""
    from rayganx.job import spec as jobspec
    from rayganx.training.bench import plain

    spec = jobspec.load(JOBS / "gmgan_ring.yaml")
    assert spec.train.r1_gamma > 0
    res = plain(spec, steps=3, warmup=1)
    assert res["flops_per_step"] is None and res["images_per_s"] > 0
