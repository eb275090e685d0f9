"""Ray Tune sweeps: checks before any trial, ASHA stopping, PBT exploits, the leaderboard."""

import json
from pathlib import Path

import pytest
import yaml

from rayganx.training import runner
from rayganx.job import spec as jobspec
from rayganx.sweeps import sweep as sweeps
from rayganx.sweeps import tune
from rayganx.job.spec import SpecError
from rayganx.store.runs import read_metrics
from rayganx.store.storage import Store
from tests.conftest import JOBS, rayganx

# The sweeps here test Tune's bookkeeping, not the networks: small ones keep each trial short.
SMALL = {"model.ngf": 16, "model.ndf": 16}
SHIPPED = sorted(JOBS.glob("tune_*.yaml")) + sorted(JOBS.glob("pbt_*.yaml"))


def sweep_file(tmp_path: Path, **keys) -> Path:
    raw = {"name": "sw", "job": str(JOBS / "dcgan_digits.yaml"), "storage": str(tmp_path / "runs"),
           "metric": "loss_d", "mode": "min"} | keys
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(tmp_path, **keys) -> str:
    with pytest.raises(SpecError) as e:
        sweeps.load(sweep_file(tmp_path, **keys))
    return str(e.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path):
    sw = sweeps.load(path)
    assert sw.metric == "fid" and sw.max_steps > sw.spec.report_every


def test_dcgan_gets_the_tuning_budget_that_chose_the_sngan_recipe():
    # tuned against tuned: the baseline's sweep is the recipe's, on the baseline's own job
    recipe, baseline = sweeps.load(JOBS / "tune_sngan_digits.yaml"), sweeps.load(JOBS / "tune_dcgan_as_sngan.yaml")
    a, b = recipe.spec.model_dump(), baseline.spec.model_dump()
    assert {k for k in a if a[k] != b[k]} == {"name", "job"}
    assert (recipe.base.name, baseline.base.name) == ("sngan_digits", "dcgan_digits")
    assert recipe.base.train.seed == baseline.base.train.seed == 0  # a search seed, not a held-out one


def test_the_default_space_prints_and_validates(tmp_path):
    res = rayganx("tune", "--defaults")
    assert res.returncode == 0, res.stderr
    space = yaml.safe_load(res.stdout)
    for key in ("recipe.loss", "train.optim_g.lr", "recipe.lr_ratio", "recipe.beta1", "recipe.beta2",
                "train.d_steps", "recipe.spectral_norm", "recipe.gp_lambda", "train.r1_gamma", "train.ema_decay",
                "recipe.diffaug", "train.batch_size", "train.seed"):
        assert key in space, key
    assert space["recipe.loss"] == {"choice": ["non_saturating", "hinge", "wgan_gp"]}
    sw = sweeps.load(sweep_file(tmp_path, include=["gan_stability"]))
    assert sw.space["train.ema_decay"] == {"choice": [None, 0.999, 0.9999]}
    # A wgan_gp trial is a valid job: Wasserstein loss, the penalty, no BatchNorm in D.
    spec = sw.trial_spec({"recipe.loss": "wgan_gp", "recipe.gp_lambda": 3.0, "recipe.lr_ratio": 4,
                          "train.optim_g.lr": 1e-4, "recipe.beta1": 0.0, "recipe.spectral_norm": True}, "t")
    assert (spec.train.loss, spec.train.gp_lambda, spec.model.d_batchnorm) == ("wasserstein", 3.0, False)
    assert spec.train.optim_d.lr == pytest.approx(4e-4) and spec.train.optim_g.betas[0] == 0.0
    assert spec.model.spectral_norm == "d" and spec.storage.checkpoint_every == sw.spec.report_every
    # Both betas at once: each keeps the other (beta2 once reset beta1 to the job's value).
    spec = sw.trial_spec({"recipe.beta1": 0.0, "recipe.beta2": 0.9}, "t")
    assert tuple(spec.train.optim_g.betas) == tuple(spec.train.optim_d.betas) == (0.0, 0.9)


def test_bad_spaces_fail_before_any_trial_naming_the_key(tmp_path):
    assert "space.train.optim_g.lrr: unknown key 'train.optim_g.lrr' (did you mean 'train.optim_g.lr'?)" in \
        error_of(tmp_path, space={"train.optim_g.lrr": {"loguniform": [1e-5, 1e-3]}})
    # A value the job spec rejects, only at one corner of the space.
    msg = error_of(tmp_path, space={"train.batch_size": {"choice": [64, 63]}})
    assert "space.train.batch_size=63" in msg and "does not split evenly" in msg
    assert "space.train.optim_g.lr.loguniform: bounds must be positive" in \
        error_of(tmp_path, space={"train.optim_g.lr": {"loguniform": [0, 1e-3]}})
    assert "space.train.d_steps: expected a value or one of" in \
        error_of(tmp_path, space={"train.d_steps": {"choise": [1, 2]}})
    assert "space.train.optim_d.lr=" in error_of(tmp_path, space={"train.optim_d.lr": {"uniform": [-1.0, 1e-3]}})
    msg = error_of(tmp_path, space={"train.optim_g.lr": {"loguniform": [1e-5, 1e-3]}},
                   scheduler={"kind": "pbt", "mutations": {"model.ngf": {"choice": [16, 32]}}})
    assert "scheduler.mutations.model.ngf: PBT can only mutate training hyperparameters" in msg
    assert "metric: unknown metric 'fdi' (did you mean 'fid'?)" in error_of(tmp_path, metric="fdi")
    assert "scheduler.grace_period" in error_of(tmp_path, report_every=50, scheduler={"grace_period": 10})
    assert "num_sample: unknown key" in error_of(tmp_path, num_sample=3)

    # Through the CLI: one line naming the key, exit 1, and nothing written to storage.
    path = sweep_file(tmp_path, space={"train.optim_g.lrr": 0.1})
    res = rayganx("tune", path)
    assert res.returncode == 1 and "space.train.optim_g.lrr" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_asha_sweep_on_object_storage_stops_trials_early_and_writes_a_runnable_best_job(ray_session, s3_server,
                                                                                           tmp_path):
    # Trials 2 and 3 start after 0 and 1 (two fit at once) with a discriminator that cannot
    # learn (loss_d stays near 2 ln 2): ASHA must stop them at the first rung. The sweep, its
    # trials' runs and Tune's state all go to the S3 server.
    import boto3

    job = tmp_path / "job.yaml"
    job.write_text((JOBS / "dcgan_digits.yaml").read_text().replace("path: runs", f"path: runs\n  endpoint_url: {s3_server}"))
    sw = sweeps.load(sweep_file(
        tmp_path, name="asha", job=str(job), storage="s3://rayganx-test/sweeps", num_samples=1, report_every=10,
        search="grid",
        space={"scaling.num_workers": 1, "train.batch_size": 32, "train.log_every": 5, **SMALL,
               "train.optim_d.lr": {"grid": [2e-4, 4e-4, 1e-9, 1e-9]}},
        scheduler={"kind": "asha", "max_steps": 40, "grace_period": 10, "reduction_factor": 2}))
    seen = []
    board = tune.run(sw, printer=lambda *event: seen.append(event))

    rows = {r["trial"]: r for r in board["trials"]}
    assert len(rows) == 4 and all(not r["status"].startswith("error") for r in rows.values())
    stopped = [r for r in rows.values() if r["status"] == "stopped early"]
    assert stopped and all(r["step"] < 40 for r in stopped)
    assert any(r["status"] == "finished" and r["step"] == 40 for r in rows.values())
    best = board["trials"][0]
    assert best["config"]["train.optim_d.lr"] >= 2e-4 and best["best"] < 1.0
    assert {e[0] for e in seen} == set(rows) and any(e[2] and "loss_d" in e[2] for e in seen)

    root = Store(sw.root, s3_server)
    assert board["best_job"] == "s3://rayganx-test/sweeps/asha/best_job.yaml"
    assert json.loads(root.read_text("leaderboard.json"))["trials"][0]["trial"] == best["trial"]
    assert Store(best["checkpoint"], s3_server).exists("state.pt")
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket="rayganx-test", Prefix="sweeps/asha/")["Contents"]}
    for t in board["trials"]:  # storage.keep prunes the older ones
        assert any(k.startswith(f"sweeps/asha/{t['trial']}/checkpoint_") and k.endswith("/state.pt") for k in keys)
    assert any(k.startswith("sweeps/asha/tune/") for k in keys)  # Tune's state, for --resume
    hparams_are_in_tensorboard(board, s3_server, tmp_path)
    best_job = tmp_path / "best_job.yaml"
    best_job.write_text(root.read_text("best_job.yaml"))
    assert best["checkpoint"] in best_job.read_text()
    spec = jobspec.load(best_job, [f"storage.path={tmp_path / 'best'}", "train.steps=4"])
    assert spec.train.optim_d.lr == best["config"]["train.optim_d.lr"] and spec.name == "asha-best"
    result = runner.run(spec)
    assert result.steps == 4 and result.checkpoints

    # The same sweep again is refused rather than mixed into the finished one.
    with pytest.raises(runner.RunError, match="already exists .* --resume"):
        tune.run(sw)


def test_relative_paths_in_the_space_are_the_drivers_and_a_failed_trial_fails_the_sweep(ray_session, on_head, tmp_path,
                                                                                         monkeypatch):
    # Trials run in Ray Tune's working directories: a relative extractor that the space sets for
    # every trial must still name the file beside the user who ran `rayganx tune`. The second
    # trial diverges at once (infinite instance noise): the sweep says so and exits 1.
    monkeypatch.chdir(tmp_path)
    cnn = runner.run(jobspec.load(JOBS / "cnn_digits.yaml", ["storage.path=runs", "train.steps=4", "model.ndf=8",
                                                             "scaling.num_workers=1", "train.batch_size=32"]))
    extractor = Path(cnn.checkpoints[-1]["url"]).relative_to(tmp_path).as_posix()
    path = sweep_file(
        tmp_path, num_samples=1, report_every=4, metric="fid", search="grid",
        space={"scaling.num_workers": 1, "train.batch_size": 32, **SMALL, "eval.num_samples": 64,
               "eval.features": "classifier", "eval.extractor": extractor,
               "train.instance_noise": {"grid": [0.0, float("inf")]}},  # .inf in the YAML
        scheduler={"kind": "fifo", "max_steps": 4})
    r = rayganx("tune", path.name, env=on_head, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    board = json.loads((tmp_path / "runs" / "sw" / "leaderboard.json").read_text())
    good, bad = sorted(board["trials"], key=lambda t: t["config"]["train.instance_noise"] != 0)
    assert good["status"] == "finished" and good["best"] > 0, good["status"]
    assert good["config"]["eval.extractor"] == str(tmp_path / extractor)
    assert bad["status"].startswith("error: training diverged by step"), bad["status"]
    assert f"1 of 2 trial(s) failed ({bad['trial']}" in " ".join(r.stderr.split()), r.stderr


def test_an_exploit_whose_donor_pruned_the_named_checkpoint_takes_the_donors_newest(tmp_path):
    # The donor trial goes on training (and pruning) while its exploiter starts: the checkpoint
    # Tune named can be gone by the time a worker loads it. Both donor checkpoints hold other weights.
    import shutil

    import torch

    from rayganx.training.checkpointing import restore
    from rayganx.training.tasks import GANTask
    from tests.conftest import local_checkpoint

    spec = jobspec.load(JOBS / "dcgan_digits.yaml", [f"storage.path={tmp_path}", "name=exploiter", "model.ngf=16", "model.ndf=16"])
    donor = tmp_path / "donor"
    states = {}
    for step in (20, 30, 40):
        torch.manual_seed(step)
        task = GANTask(spec, None, torch.device("cpu"), distributed=False)
        local_checkpoint(donor / f"checkpoint_{step:06d}", task, step)
        states[step] = task.state_dict()
    shutil.rmtree(donor / "checkpoint_000020")
    named = str(donor / "checkpoint_000020")
    state, note, from_donor = restore(spec, None, named, torch.device("cpu"))
    assert from_donor and state["step"] == 40 and "pruned" in note and str(donor / "checkpoint_000040") in note
    assert torch.equal(state["models"]["g"]["net.layers.0.weight"], states[40]["models"]["g"]["net.layers.0.weight"])
    assert state["lineage"] == named  # a worker restart recognises the take-over it already made
    # The named one, when it is there, is the one taken.
    state, note, _ = restore(spec, None, str(donor / "checkpoint_000030"), torch.device("cpu"))
    assert state["step"] == 30 and note is None


def test_a_failed_trial_reads_as_its_error_not_as_rays_header():
    from ray.exceptions import RayTaskError

    from rayganx.training.failures import root_cause

    wrapped = RayTaskError("ImplicitFunc.train", "Traceback ...\nRunError: boom",
                           runner.RunError("training diverged by step 3: non-finite values")).as_instanceof_cause()
    assert isinstance(wrapped, runner.RunError)
    assert root_cause(wrapped) == "training diverged by step 3: non-finite values"


@pytest.mark.slow
def test_async_pbt_at_two_speeds_never_reuses_a_checkpoint_folder_and_resumes_after_ctrl_c(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from rayganx.store.runs import CHECKPOINT_RE, list_checkpoints, load_state
    from tests.conftest import ROOT

    # Trial d_steps=3 takes three batches a step: the other, faster and (its D weaker) worse by loss_d,
    # exploits it at a lower step than its own, asynchronously, again and again.
    path = sweep_file(tmp_path, name="pbt", num_samples=1, report_every=10, search="random",
                      space={"scaling.num_workers": 1, "train.batch_size": 32, "train.log_every": 5, **SMALL,
                             "storage.keep": 2, "train.d_steps": {"grid": [1, 3]}},
                      scheduler={"kind": "pbt", "max_steps": 80, "perturbation_interval": 20, "quantile_fraction": 0.5,
                                 "synch": False, "resample_probability": 0.0,
                                 "mutations": {"train.optim_g.lr": {"loguniform": [1e-5, 1e-2]}}})
    runs = tmp_path / "runs" / "pbt"

    def exploited() -> bool:
        return any("restored_from" in m for t in runs.glob("trial_*") for m in read_metrics(Store(str(t))))

    proc = subprocess.Popen([sys.executable, "-m", "rayganx.cli", "tune", str(path)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (runs.exists() and exploited()):
        time.sleep(1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C, after an exploit
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), out + err
    r = rayganx("tune", path, "--resume", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    board = json.loads((runs / "leaderboard.json").read_text())
    lower = 0
    for trial in sorted(runs.glob("trial_*")):
        rows = read_metrics(Store(str(trial)))
        events = [json.loads(line) for part in sorted((trial / "metrics").glob("part_*.jsonl"))
                  for line in part.read_text().splitlines() if "step" not in json.loads(line) or "event" in line]
        assert rows[-1]["step"] == 80, (trial.name, rows[-1]["step"], board["trials"], events, r.stdout[-3000:])
        # The raw parts, in order (read_metrics drops the rows a restore superseded): a restore to a
        # step below the last one trained is a take-over of an earlier checkpoint.
        trained = 0
        for part in sorted((trial / "metrics").glob("part_*.jsonl")):
            for raw in map(json.loads, part.read_text().splitlines()):
                if "restart_from" in raw and raw["restart_from"] < trained:
                    lower += 1
                elif "step" in raw and "event" not in raw:
                    trained = raw["step"]
        # Every checkpoint Ray still lists for the trial's run exists, is complete and loads: none was
        # pruned under another entry's name (a folder name written twice).
        snapshot = json.loads((trial / "checkpoint_manager_snapshot.json").read_text())
        listed = [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
        assert listed and len(set(listed)) == len(listed)
        complete = {c["name"] for c in list_checkpoints(Store(str(trial)))}
        for name in listed:
            assert CHECKPOINT_RE.match(name) and name in complete, (trial.name, name, complete)
            assert load_state(str(trial / name))["models"]["g"]
    assert lower, "no trial took over a checkpoint at a lower step than its own"


def hparams_are_in_tensorboard(board: dict, s3_server: str, tmp_path: Path) -> None:
    # TensorBoard's HParams view: each trial's tb/ holds its session (config, end status) beside
    # the scalar the sweep ranks by, read back with TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    from rayganx.store.tracking import sync_events

    ended = []
    for t in board["trials"]:
        local = tmp_path / "tb" / t["trial"]
        sync_events(Store(t["run"], s3_server), str(local))
        ea = EventAccumulator(str(local), size_guidance={"scalars": 0, "tensors": 0})
        ea.Reload()
        content = {k: plugin_data_pb2.HParamsPluginData.FromString(v)
                   for k, v in ea.PluginTagToContent("hparams").items()}
        start = content["_hparams_/session_start_info"].session_start_info
        assert start.hparams["train.optim_d.lr"].number_value == t["config"]["train.optim_d.lr"]
        if t["status"] == "finished" and "_hparams_/session_end_info" in content:
            ended.append(content["_hparams_/session_end_info"].session_end_info.status)
        metrics = [m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos]
        assert metrics[0] == "loss_d" and ea.Scalars("loss_d")[-1].step == t["step"]
    # A trial that ASHA ends at max_steps is stopped by Tune, not finished by its own loop, and writes
    # no session end (known gap, see the closing note of issue 32's wave); any end written is a success.
    assert set(ended) <= {api_pb2.STATUS_SUCCESS}, ended
