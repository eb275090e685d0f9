"""Real 2-worker DDP training through Ray Train on the shared local Ray instance."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rayganx import data as rdata, models, runner, spec as jobspec
from rayganx.storage import Store, list_checkpoints, load_state, read_metrics
from rayganx.train import GANTask
from tests.conftest import JOBS, tiny, write_job


@pytest.mark.parametrize("kind,size", [("dcgan", 32), ("dcgan", 64), ("resnet_gan", 32), ("resnet_gan", 64)])
def test_generators_produce_the_job_image_size(kind, size):
    spec = jobspec.from_dict({"name": "x", "model": {"kind": kind, "ngf": 8, "ndf": 8},
                              "data": {"image_size": size, "channels": 3}, "train": {"steps": 1}})
    nets = models.build(spec)
    x = nets["g"](torch.randn(4, 100))
    assert x.shape == (4, 3, size, size) and x.abs().max() <= 1
    assert nets["d"](x).shape == (4,)


def test_mlp_gan_defaults_match_the_classic_gan():
    spec = jobspec.from_dict({"name": "x", "model": {"kind": "mlp_gan"}, "data": {"image_size": 28},
                              "train": {"steps": 1}})
    g = models.build(spec)["g"]
    linears = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(100, 128), (128, 128), (128, 784)]


def test_gan_ddp_run_writes_checkpoints_grids_and_metrics_then_resumes(ray_session, tmp_path):
    job = write_job(tmp_path / "job.yaml", "dcgan_digits.yaml",
                    **tiny("ddp_gan", tmp_path / "runs", steps=8))
    spec = jobspec.load(job)
    assert spec.scaling.num_workers == 2
    result = runner.run(spec)
    run = Store(spec.run_url)
    ckpts = list_checkpoints(run)
    assert [c["step"] for c in ckpts] == [4, 8]
    state = load_state(run.path("checkpoint_000008"))
    assert set(state["models"]) == {"g", "d"} and set(state["optimizers"]) == {"g", "d"}
    assert state["step"] == 8 and state["spec"]["name"] == "ddp_gan" and "rng" in state
    grid = Image.open(run.path("samples", "step_000008.png"))
    assert grid.size[0] > 32 * 4  # a grid of several 32 px images
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert all(np.isfinite(m["loss_d"]) and m["images_per_s"] > 0 and 0 <= m["d_real"] <= 1 for m in metrics)
    assert result.steps == 8

    # Submitting the same job name again continues from the last checkpoint.
    more = jobspec.load(job, ["train.steps=12"])
    result = runner.run(more)
    assert result.steps == 12
    assert [m["step"] for m in read_metrics(run)] == [2, 4, 6, 8, 10, 12]
    resumed = load_state(run.path("checkpoint_000012"))
    assert resumed["step"] == 12
    assert [c["step"] for c in list_checkpoints(run)] == [8, 12]  # keep: 2


def test_cnn_reaches_97_percent_on_digits(ray_session, tmp_path):
    spec = jobspec.load(JOBS / "cnn_digits.yaml", ["storage.path=" + str(tmp_path), "train.log_every=100"])
    result = runner.run(spec)
    assert result.metrics["val_accuracy"] >= 0.97, result.metrics
    meta = json.loads(Store(spec.run_url).read_text(result.checkpoints[-1]["name"], "meta.json"))
    assert meta["metrics"]["val_accuracy"] >= 0.97


def test_mlp_gan_on_the_ring(ray_session, tmp_path):
    job = write_job(tmp_path / "ring.yaml", "mlp_gan_ring.yaml", **tiny("ring", tmp_path, steps=4))
    result = runner.run(jobspec.load(job, ["train.steps=4"]))
    assert result.steps == 4 and result.samples


def test_bad_data_fails_before_training_and_loses_nothing(ray_session, tmp_path):
    job = write_job(tmp_path / "job.yaml", "dcgan_digits.yaml", **tiny("keep", tmp_path / "runs", steps=2))
    runner.run(jobspec.load(job))
    before = sorted(p.name for p in (tmp_path / "runs" / "keep").iterdir())
    folder = tmp_path / "imgs"
    rdata.prepare_digits(str(folder), "folder", size=32)
    (folder / "3" / "bad.png").write_bytes(b"not a png")
    spec = jobspec.load(job, [f"data.source=image_folder", f"data.path={folder}", "train.steps=4"])
    with pytest.raises(runner.RunError, match="bad.png"):
        runner.run(spec)
    assert sorted(p.name for p in (tmp_path / "runs" / "keep").iterdir()) == before
    assert [c["step"] for c in list_checkpoints(Store(str(tmp_path / "runs" / "keep")))] == [1, 2]


def test_epochs_count_passes_over_the_batches_a_gan_consumes(tmp_path):
    # Each discriminator step takes a batch; the generator step reuses the last one's fakes.
    spec = jobspec.from_dict({"name": "e", "model": {"kind": "mlp_gan", "hidden": [8]}, "data": {"image_size": 8},
                              "train": {"epochs": 5, "batch_size": 64, "d_steps": 5, "loss": "wasserstein",
                                        "gp_lambda": 10.0},
                              "scaling": {"num_workers": 1}, "storage": {"path": str(tmp_path)}})
    task = GANTask(spec, None, torch.device("cpu"), distributed=False)
    stepped = [task.step(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), it, 0, 10)[0]
               for it in range(10)]
    assert stepped == [False] * 4 + [True] + [False] * 4 + [True]
    batches_per_epoch = 1797 // 64  # the digits, last partial batch dropped
    total = runner.plan(spec).total_steps
    assert total * 5 <= 5 * batches_per_epoch < (total + 1) * 5  # 5 epochs of batches, not 25
    one_d_step = runner.plan(spec.model_copy(update={"train": spec.train.model_copy(update={"d_steps": 1})}))
    assert one_d_step.total_steps == 5 * batches_per_epoch
