"""Exact resume: the data order, the random draws and the training state are functions of the
spec, the seed and the position, whatever the number of workers and however a run was
interrupted. Unit tests here need no Ray; the runs that prove it end to end are in test_faults."""

import random

import numpy as np
import pytest
import torch

from rayganx.data import order
from rayganx.models import randomness
from rayganx.data import rows
from rayganx.job import spec as jobspec
from rayganx.data.order import Position
from rayganx.training.tasks import GANTask
from tests.conftest import local_checkpoint, rayganx, write_job

# --------------------------------------------------------------------------- the data order


def _take(n, batch, seed, start, count):
    feed = order.global_batches(n, batch, seed, start)
    return [next(feed) for _ in range(count)]


def test_every_epoch_is_a_permutation_read_once_and_the_seed_repeats_it():
    n, batch, seed = 100, 16, 3  # 6 global batches an epoch; 4 rows wait for the next epoch's order
    got = _take(n, batch, seed, Position(), 18)
    epochs = [np.concatenate([ids for pos, ids in got if pos.epoch == e]) for e in range(3)]
    assert all(len(e) == len(set(e.tolist())) == 96 for e in epochs)  # no row twice in an epoch
    assert len(set(epochs[0].tolist()) | set(epochs[1].tolist())) > 96  # the left-over rows differ
    assert not np.array_equal(epochs[0], epochs[1])  # a new order every epoch
    assert [p.batches for p, _ in got] == list(range(18))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(got, _take(n, batch, seed, Position(), 18)))
    assert not np.array_equal(got[0][1], _take(n, batch, seed + 1, Position(), 1)[0][1])
    # the points' stream, default_rng(seed), is not the order's
    assert not np.array_equal(got[0][1], np.random.default_rng(seed).permutation(n)[:batch])


def test_a_run_resumed_at_any_position_reads_what_an_uninterrupted_one_reads():
    n, batch, seed = 100, 16, 3
    whole = _take(n, batch, seed, Position(), 20)
    for k in (1, 5, 6, 7, 13):  # inside an epoch, at its last batch, at an epoch's start
        resumed = _take(n, batch, seed, order.after(whole[k - 1][0], batch), 20 - k)
        assert [(p, ids.tolist()) for p, ids in resumed] == [(p, ids.tolist()) for p, ids in whole[k:]]


def test_a_global_batch_holds_the_same_rows_for_any_worker_count():
    ids = _take(100, 12, 0, Position(), 1)[0][1]
    for world in (1, 2, 3, 4):
        parts = [order.rank_slice(ids, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(parts), ids)


def test_reader_of_points_and_of_a_table_follows_the_order():
    src = rows.Points("ring", 200, 5)
    pts = rows.Reader(src, 32, 5).blocks[0]["image"]
    whole = list(zip(range(12), rows.Reader(src, 32, 5).batches()))
    two = [rows.Reader(src, 32, 5, rank=r, world=2).batches(Position(1, 32, 7)) for r in range(2)]
    for (_, (pos, b)), r0, r1 in zip(whole[7:], *[[next(t) for _ in range(5)] for t in two]):
        assert r0[0] == r1[0] == pos
        assert torch.equal(torch.cat([r0[1]["image"], r1[1]["image"]]), b["image"])
        assert torch.equal(b["image"], torch.from_numpy(pts[b["id"].numpy()]))


# --------------------------------------------------------------------------- the random draws


def test_draws_of_a_global_batch_do_not_depend_on_the_worker_count():
    one = randomness.Draws(7, 42)
    whole = [one.randn(12, 3), one.rand(12), one.randint(0, 9, 12, 1)]
    for world in (2, 3, 4):
        per = [randomness.Draws(7, 42, rank=r, world=world) for r in range(world)]
        parts = [[d.randn(12 // world, 3), d.rand(12 // world), d.randint(0, 9, 12 // world, 1)] for d in per]
        for i, full in enumerate(whole):
            assert torch.equal(torch.cat([p[i] for p in parts]), full)
    assert not torch.equal(randomness.Draws(7, 43).randn(12, 3), whole[0])  # another batch, other numbers
    assert not torch.equal(randomness.Draws(8, 42).randn(12, 3), whole[0])  # another seed


def test_isolated_puts_every_global_stream_back():
    randomness.seed_all(1)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    randomness.seed_all(1)
    with randomness.isolated():
        torch.manual_seed(99), np.random.seed(99), random.seed(99)
        torch.rand(5), np.random.rand(5), random.random()
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


def test_evaluation_leaves_the_training_streams_where_they_were():
    # FID, KID and precision/recall, a sample grid, and CAS: none of them moves a global stream a
    # training run draws from (KID's subsets and CAS's classifiers draw seeded numbers of their own).
    from rayganx.evaluation import metrics
    from rayganx.job.sections import DataSpec
    from rayganx.job.spec import from_dict

    spec = from_dict({"name": "e", "model": {"kind": "dcgan", "ngf": 4, "ndf": 4, "conditional": True},
                      "data": {"labels": True, "image_size": 32}, "train": {"steps": 1}, "scaling": {"num_workers": 1}})
    torch.manual_seed(0)
    task = GANTask(spec, 10, torch.device("cpu"), distributed=False)
    from rayganx.data.sources import digits_images

    d = DataSpec(source="digits", labels=True)
    real = {s: tuple(torch.from_numpy(a)[:200] for a in digits_images(d, s)) for s in ("train", "val")}
    feats = torch.randn(300, 8)
    randomness.seed_all(3)
    before = randomness.capture()
    metrics.compute(["fid", "kid", "pr"], feats[:150], feats[150:], None)
    task.sample_png(16, 1)
    metrics.classification_accuracy_score(task.generator(), spec, 10, real, steps=2)
    after = randomness.capture()
    assert torch.equal(before["torch"], after["torch"]) and before["python"][1].equal(after["python"][1])
    assert before["numpy"][1].equal(after["numpy"][1]) and before["numpy"][2] == after["numpy"][2]


def test_captured_streams_round_trip_through_a_weights_only_file(tmp_path):
    randomness.seed_all(5)
    torch.rand(2), np.random.rand(2), random.random()
    torch.save({"rng": [randomness.capture()]}, tmp_path / "s.pt")
    expect = (torch.rand(4), np.random.rand(4), random.random())
    randomness.seed_all(0)
    randomness.restore(torch.load(tmp_path / "s.pt", weights_only=True)["rng"][0])
    got = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


# --------------------------------------------------------------------------- the training state


def tensors(state: dict, prefix: str = "") -> dict:
    """Every tensor of a (nested) state, by dotted path."""
    out = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= tensors(v, key + ".")
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                out |= tensors(item, f"{key}.{i}.")
        elif torch.is_tensor(v):
            out[key] = v
    return out


def assert_same_state(a: dict, b: dict, keys=("models", "optimizers")) -> None:
    """Bitwise equality of every tensor under `keys` (models include the EMA copy, g_ema)."""
    ta, tb = tensors({k: a[k] for k in keys}), tensors({k: b[k] for k in keys})
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ, e.g. {differ[:3]}"


def _spec(**train):
    return jobspec.from_dict({"name": "r", "model": {"kind": "dcgan", "ngf": 4, "ndf": 4, "spectral_norm": "d"},
                              "train": {"steps": 6, "batch_size": 8, "ema_decay": 0.9, "diffaug": ["translation"],
                                        "instance_noise": 0.1, **train},
                              "scaling": {"num_workers": 1}})


def _steps(task, start, count, spec):
    real = torch.rand(count + start, 8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for i in range(start, start + count):
        task.schedule(i, spec.train.steps)
        task.step(real[i], torch.zeros(8, dtype=torch.long), i, i, spec.train.steps, randomness.Draws(0, i))


def test_a_restored_task_continues_exactly_as_the_one_that_saved_it():
    spec = _spec()
    torch.manual_seed(0)
    a = GANTask(spec, None, torch.device("cpu"), distributed=False)
    _steps(a, 0, 3, spec)
    saved = torch.load(_roundtrip(a.state_dict()), weights_only=True)
    torch.manual_seed(1)  # other initial weights: only the restore can make them equal
    b = GANTask(spec, None, torch.device("cpu"), distributed=False)
    b.load_state_dict(saved)
    assert_same_state(b.state_dict(), a.state_dict())
    assert any(k.endswith("._u") for k in saved["models"]["d"])  # spectral norm's power iteration vector
    _steps(a, 3, 3, spec)
    _steps(b, 3, 3, spec)
    assert_same_state(b.state_dict(), a.state_dict())


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


# --------------------------------------------------------------------------- a changed job


def _stored_run(tmp_path, job):
    spec = jobspec.load(job)
    run = tmp_path / "runs" / spec.name
    torch.manual_seed(0)
    local_checkpoint(run / "checkpoint_000004", GANTask(spec, None, torch.device("cpu"), False), 4)
    (run / "spec.yaml").write_text(spec.to_yaml())
    return run


def test_a_changed_job_is_refused_naming_each_change_and_nothing_is_written(tmp_path):
    base = {"name": "chg", "model": {"ngf": 4, "ndf": 4}, "storage": {"path": str(tmp_path / "runs")},
            "train": {"steps": 8, "batch_size": 32}, "scaling": {"num_workers": 1}}
    job = write_job(tmp_path / "j.yaml", **base)
    run = _stored_run(tmp_path, job)
    before = sorted(p.name for p in run.rglob("*"))
    r = rayganx("submit", job, "--set", "train.optim_g.lr=0.001", "--set", "model.ngf=8", "--set", "train.steps=2")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "trained up to step 4 under another spec" in lines[0]
    assert any("model.ngf: 4 -> 8" in ln for ln in lines)
    assert any("train.optim_g.lr: 0.0002 -> 0.001" in ln for ln in lines)
    assert any("train.steps: 8 -> 2" in ln for ln in lines)
    assert "--allow-changes" in lines[-1]
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written, spec.yaml untouched
    assert "ngf: 4" in (run / "spec.yaml").read_text()


def test_changes_a_continued_run_can_honour_are_accepted_and_recorded():
    from rayganx.job.continuation import continuation_problems
    from rayganx.job.spec import from_dict

    stored = from_dict({"name": "a", "train": {"steps": 8}}).to_dict()
    honoured = from_dict({"name": "a", "train": {"steps": 20, "log_every": 5}, "samples": {"every": 7},
                          "eval": {"every": 10}, "scaling": {"num_workers": 1, "max_failures": 2},
                          "storage": {"checkpoint_every": 5}})
    assert continuation_problems(stored, honoured) == []
    assert continuation_problems(stored, from_dict({"name": "a", "train": {"steps": 8, "seed": 1}})) == [
        "train.seed: 0 -> 1"]


def test_runs_show_says_which_steps_ran_under_which_spec(tmp_path):
    from rayganx.store.runs import record_attempt, spec_history
    from rayganx.store.storage import Store

    job = write_job(tmp_path / "j.yaml", name="hist", storage={"path": str(tmp_path / "runs")},
                    model={"ngf": 4, "ndf": 4}, train={"steps": 8, "batch_size": 32}, scaling={"num_workers": 1})
    run = _stored_run(tmp_path, job)
    first = jobspec.load(job)
    record_attempt(Store(str(run)), first.to_yaml(), 0)
    record_attempt(Store(str(run)), jobspec.load(job, ["train.optim_g.lr=0.001"]).to_yaml(), 4)
    assert [(h["attempt"], h["start_step"]) for h in spec_history(Store(str(run)))] == [(1, 0), (2, 4)]
    r = rayganx("runs", "show", run)
    assert r.returncode == 0, r.stderr
    assert "attempt 1: steps 0-4" in r.stdout and "attempt 2: steps 4-" in r.stdout, r.stdout
    assert "train.optim_g.lr: 0.0002 -> 0.001" in r.stdout


def test_a_dataset_smaller_than_a_global_batch_is_one_line():
    from rayganx.data.sources import DataError

    with pytest.raises(DataError, match="data: 100 rows are fewer than one global batch"):
        next(rows.Reader(rows.Points("ring", 100, 0), 128, 0, world=2).batches())
