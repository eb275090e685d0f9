"""The stabilised recipes through the real 2-worker DDP path on the shared local Ray."""

import numpy as np
import pytest
import torch
from PIL import Image

from rayganx.training import runner
from rayganx.job import spec as jobspec
from rayganx.store.runs import list_checkpoints, load_state, read_metrics
from rayganx.store.storage import Store
from rayganx.models.trained import sample_inputs
from tests.conftest import tiny, write_job


def run_job(tmp_path, base, name, steps=4, overrides=(), **sections):
    job = write_job(tmp_path / f"{name}.yaml", base, **tiny(name, tmp_path / "runs", steps=steps, **sections))
    spec = jobspec.load(job, list(overrides))
    return spec, runner.run(spec), Store(spec.run_url)


@pytest.mark.parametrize("job", ["wgan_gp_digits.yaml", "sngan_digits.yaml"])
def test_digits_recipe_runs_and_checkpoints(ray_session, tmp_path, job):
    spec, result, run = run_job(tmp_path, job, job.split(".")[0])
    assert spec.scaling.num_workers == 2
    assert [c["step"] for c in list_checkpoints(run)] == [2, 4]
    state = load_state(run.path("checkpoint_000004"))
    assert ("g_ema" in state["models"]) == bool(spec.train.ema_decay)
    assert all(np.isfinite(m["loss_d"]) for m in read_metrics(run))


def test_regularisers_combined(ray_session, tmp_path):
    """R1 (lazy), DiffAugment, EMA, label smoothing, instance noise, clipping and TTUR together."""
    spec, result, run = run_job(
        tmp_path, "dcgan_digits.yaml", "combined", steps=4,
        train={"r1_gamma": 1.0, "r1_every": 2, "diffaug": ["translation", "color", "cutout"],
               "ema_decay": 0.99, "label_smoothing": 0.1, "instance_noise": 0.1, "grad_clip": 10.0,
               "d_steps": 2, "optim_d": {"lr": 4e-4, "betas": [0.0, 0.9]}, "optim_g": {"lr": 1e-4, "betas": [0.0, 0.9]}})
    assert result.steps == 4
    state = load_state(run.path("checkpoint_000004"))
    assert set(state["models"]) == {"g", "d", "g_ema"}
    assert state["optimizers"]["d"]["param_groups"][0]["lr"] == 4e-4
    assert state["optimizers"]["g"]["param_groups"][0]["betas"] == (0.0, 0.9)
    # d_steps=2: 4 generator steps consumed 8 batches of 64 images
    assert state["optimizers"]["d"]["state"][0]["step"].item() == 8
    assert state["optimizers"]["g"]["state"][0]["step"].item() == 4


def test_conditional_gan_grid_has_one_class_per_row(ray_session, tmp_path):
    spec, result, run = run_job(tmp_path, "cgan_digits.yaml", "cgan", steps=2, samples={"every": 2, "n": 80})
    z, y, per_row = sample_inputs(spec, spec.samples.n, 0, 10)
    assert per_row == 8 and y.view(10, 8).tolist() == [[k] * 8 for k in range(10)]
    grid = Image.open(run.path("samples", "step_000002.png"))
    assert grid.size == (2 + 8 * 34, 2 + 10 * 34)  # 8 columns, 10 class rows of 32 px + padding
    state = load_state(run.path("checkpoint_000002"))
    assert state["num_classes"] == 10 and any(k.startswith("head.embed.") for k in state["models"]["d"])


def test_vae_elbo_improves(ray_session, tmp_path):
    spec, result, run = run_job(tmp_path, "vae_digits.yaml", "vae", steps=30, train={"log_every": 5})
    elbo = [m["elbo"] for m in read_metrics(run)]
    assert len(elbo) == 6 and elbo[-1] > elbo[0] + 50, elbo
    assert {"recon", "kl", "elbo"} <= set(read_metrics(run)[-1])
    assert Image.open(run.path("samples", "step_000030.png")).size[0] > 32


def test_sngan_celeba_recipe_on_stand_in_images(ray_session, tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(folder / f"{i:06d}.jpg")
    spec, result, run = run_job(
        tmp_path, "sngan_celeba.yaml", "sngan_celeba", steps=2,
        overrides=[f"data.path={tmp_path}/celeba", "model.ngf=8", "model.ndf=8", "train.batch_size=8"])
    assert spec.model.kind == "resnet_gan" and spec.train.diffaug and spec.train.ema_decay
    assert Image.open(run.path("samples", "step_000002.png")).size[0] > 64 * 4


def test_forced_nan_rolls_back_then_fails_with_message_and_keeps_last_good_checkpoint(ray_session, tmp_path):
    spec, result, run = run_job(tmp_path, "dcgan_digits.yaml", "nan", steps=4)
    assert [c["step"] for c in list_checkpoints(run)] == [2, 4]
    # infinite instance noise on D's inputs makes the losses NaN at every step: each rollback
    # (lower learning rates, next batches) diverges again until max_rollbacks is spent
    diverging = jobspec.load(tmp_path / "nan.yaml", ["train.steps=8", "train.instance_noise=.inf",
                                                     "train.max_rollbacks=2"])
    with pytest.raises(runner.RunError, match=r"training diverged by step 6: non-finite values \(loss_d=nan.*"
                                              r"gave up after train.max_rollbacks=2 rollback"):
        runner.run(diverging, allow_changes=True)  # the same run, under a changed (broken) recipe
    assert [c["step"] for c in list_checkpoints(run)] == [2, 4]
    state = load_state(run.path("checkpoint_000004"))
    assert all(torch.isfinite(v).all() for v in state["models"]["g"].values() if v.is_floating_point())
    rows = read_metrics(run)
    assert max(m["step"] for m in rows) == 4
    rollbacks = [m for m in rows if m.get("event") == "rollback"]
    assert [(m["step"], m["rollback"], m["lr_scale"]) for m in rollbacks] == [(4, 1, 0.5), (4, 2, 0.25)]
    # and the run continues from that checkpoint once the cause is fixed
    assert runner.run(jobspec.load(tmp_path / "nan.yaml", ["train.steps=6"]), allow_changes=True).steps == 6
