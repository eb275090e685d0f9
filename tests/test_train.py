"""Real 2-worker DDP training through Ray Train on the shared local Ray instance."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rayganx.models import networks
from rayganx.training import runner
from rayganx.job import spec as jobspec
from rayganx.models.randomness import Draws
from rayganx.store.runs import list_checkpoints, load_state, read_metrics
from rayganx.store.storage import Store
from rayganx.training.tasks import GANTask
from rayganx.data.prepare import prepare_digits
from tests.conftest import JOBS, tiny, write_job


@pytest.mark.parametrize("kind,size", [("dcgan", 32), ("dcgan", 64), ("resnet_gan", 32), ("resnet_gan", 64)])
def test_generators_produce_the_job_image_size(kind, size):
    spec = jobspec.from_dict({"name": "x", "model": {"kind": kind, "ngf": 8, "ndf": 8},
                              "data": {"image_size": size, "channels": 3}, "train": {"steps": 1}})
    nets = networks.build(spec)
    x = nets["g"](torch.randn(4, 100))
    assert x.shape == (4, 3, size, size) and x.abs().max() <= 1
    assert nets["d"](x).shape == (4,)


def test_mlp_gan_defaults_match_the_classic_gan():
    spec = jobspec.from_dict({"name": "x", "model": {"kind": "mlp_gan"}, "data": {"image_size": 28},
                              "train": {"steps": 1}})
    g = networks.build(spec)["g"]
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


def test_bad_data_fails_before_training_and_loses_nothing(ray_session, tmp_path):
    job = write_job(tmp_path / "job.yaml", "dcgan_digits.yaml", **tiny("keep", tmp_path / "runs", steps=2))
    runner.run(jobspec.load(job))
    before = sorted(p.name for p in (tmp_path / "runs" / "keep").iterdir())
    folder = tmp_path / "imgs"
    prepare_digits(str(folder), "folder", size=32)
    (folder / "3" / "bad.png").write_bytes(b"not a png")
    spec = jobspec.load(job, ["data.source=image_folder", f"data.path={folder}", "train.steps=4"])
    with pytest.raises(runner.RunError, match="another spec"):  # a changed job is refused first
        runner.run(spec)
    with pytest.raises(runner.RunError, match="bad.png"):  # and, allowed, its bad data before anything is written
        runner.run(spec, allow_changes=True)
    assert sorted(p.name for p in (tmp_path / "runs" / "keep").iterdir()) == before
    assert "source: digits" in (tmp_path / "runs" / "keep" / "spec.yaml").read_text()
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


def _on_two_workers(loop, tmp_path, **config) -> dict:
    """Run `loop` on a real 2-worker Ray Train group (gloo DDP on CPU); rank 0's JSON result."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import sys

    import ray.cloudpickle

    # pytest imports this file under a name the workers cannot import: ship the loop by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "rank0.json"
    TorchTrainer(loop, train_loop_config={**config, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"w2_{tmp_path.name}", storage_path=str(tmp_path / "ray"))).fit()
    return json.loads(out.read_text())


def _penalties_under_ddp(config):
    """Train a few steps with DDP on two workers (B/2 rows each) and without on rank 0 (all B),
    from the same weights and the same noise per row; the largest differences."""
    import ray.train

    from rayganx.training.tasks import unwrap

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    result = {}
    for name, train in config["cases"].items():
        spec = jobspec.from_dict({"name": "ddp", "model": {"kind": "mlp_gan", "hidden": [32, 32]},
                                  "data": {"image_size": 8}, "scaling": {"num_workers": world},
                                  "train": {"steps": 1, "batch_size": 16, **train}})
        steps, b = config["steps"], spec.train.batch_size
        gen = torch.Generator().manual_seed(1)
        reals = torch.rand(steps, b, 1, 8, 8, generator=gen) * 2 - 1

        def train_steps(distributed, rank, world):
            torch.manual_seed(0)
            task = GANTask(spec, None, torch.device("cpu"), distributed)
            flat = lambda attr: torch.cat([getattr(p, attr).detach().flatten()  # noqa: E731
                                           for net in (task.d, task.g) for p in unwrap(net).parameters()])
            grads, start, n = [], flat("data").clone(), b // world
            for it in range(steps):  # d_steps 1: D and G step every time, D's gradient includes the penalty
                # Each worker's rows of the global batch, and their draws: row i's latent and interpolation
                # weight are the same on any number of workers (rayganx.models.randomness.Draws).
                task.step(reals[it, rank * n:(rank + 1) * n], torch.zeros(n, dtype=torch.long), it, it, steps,
                          Draws(5, it, rank, world))
                grads.append(flat("grad"))
            return torch.stack(grads), flat("data"), start

        grads, params, _ = train_steps(True, rank, world)
        if rank == 0:
            ref_grads, ref_params, start = train_steps(False, 0, 1)
            result[name] = {"grad": ((grads - ref_grads).abs().max() / ref_grads.abs().max()).item(),
                            "param": (params - ref_params).abs().max().item(),
                            "moved": (ref_params - start).abs().max().item()}
    if rank == 0:
        with open(config["out"], "w") as f:
            json.dump(result, f)


def test_two_workers_match_one_worker_with_the_whole_batch_penalties_included(ray_session, tmp_path):
    # What an elastic resize relies on: the same global batch and the same draws per row on 2 workers
    # and on 1 give the same updates. Both penalties differentiate D's input gradient again (double
    # backward) through DDP. No BatchNorm or dropout: the only difference left is float summation order.
    adam = {"optim_g": {"lr": 1e-3}, "optim_d": {"lr": 1e-3}}
    cases = {"wgan_gp": {"loss": "wasserstein", "gp_lambda": 10.0, **adam},
             "r1": {"loss": "non_saturating", "r1_gamma": 1.0, **adam},
             "r1_lazy_gp": {"loss": "wasserstein", "gp_lambda": 10.0, "r1_gamma": 1.0, "r1_every": 2, **adam}}
    result = _on_two_workers(_penalties_under_ddp, tmp_path, cases=cases, steps=5)
    for name in cases:
        r = result[name]
        assert r["grad"] < 1e-5, (name, r)  # each step's gradients, relative to the largest (seen: 6.4e-7)
        # Adam divides by the gradient's size, so summation-order noise in near-zero components
        # reaches the weights (seen: up to 4.4e-6 of 5.7e-3 moved): 1% of the largest move.
        assert r["param"] < 1e-2 * r["moved"], (name, r)  # after 5 Adam steps at lr 1e-3


def _sync_batchnorm_networks(config):
    import ray.train

    from rayganx.training.tasks import unwrap

    result = {}
    for sync in (False, True):
        job = {**config["job"], "model": {**config["job"]["model"], "sync_batchnorm": sync}}
        try:
            task = GANTask(jobspec.from_dict(job), None, torch.device("cpu"), distributed=True)
        except ValueError as e:  # DDP on CPU refuses SyncBatchNorm: it was converted before the wrap
            result[str(sync)] = str(e)
            continue
        result[str(sync)] = {k: [type(net).__name__] + sorted({type(m).__name__ for m in unwrap(net).modules()
                                                               if "BatchNorm" in type(m).__name__})
                             for k, net in (("g", task.g), ("d", task.d))}
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump(result, f)


def test_sync_batchnorm_converts_before_the_ddp_wrap(ray_session, tmp_path):
    job = {"name": "sbn", "model": {"kind": "dcgan", "ngf": 8, "ndf": 8, "sync_batchnorm": True},
           "train": {"steps": 1}, "scaling": {"num_workers": 2, "use_gpu": True}}
    result = _on_two_workers(_sync_batchnorm_networks, tmp_path, job=job)
    assert result["False"] == {"g": ["DistributedDataParallel", "BatchNorm2d"],
                               "d": ["DistributedDataParallel", "BatchNorm2d"]}
    # This machine has no GPU; PyTorch's DDP finds the SyncBatchNorm layers in what it wraps.
    assert result["True"] == "SyncBatchNorm layers only work with GPU modules"
    with pytest.raises(jobspec.SpecError, match="model.sync_batchnorm: PyTorch synchronises BatchNorm on GPUs"):
        jobspec.from_dict({**job, "scaling": {"num_workers": 2}})
    jobspec.from_dict({**job, "scaling": {"num_workers": 1}})  # nothing to synchronise: allowed
