"""Synthetic training data (data.synthetic), the low-data subset (data.per_class) and the
Classification Accuracy Score (eval cas). Real generators, real runs, no mocks."""

import json

import pytest
import torch

from rayganx.data import sources as rdata
from rayganx.data import generate
from rayganx.training import runner
from rayganx.data import synthetic
from rayganx.job import spec as jobspec
from rayganx.store.runs import read_metrics
from rayganx.store.storage import Store
from rayganx.data.prepare import prepare_digits
from tests.conftest import JOBS, local_checkpoint, rayganx, tiny, write_job


def _ckpt(path, job, *overrides, num_classes=10):
    """An (untrained) generator's checkpoint, as a run writes it."""
    from rayganx.training.tasks import GANTask

    spec = jobspec.load(JOBS / job, ["model.ngf=8", "model.ndf=8", *overrides])
    torch.manual_seed(0)
    task = GANTask(spec, num_classes if spec.model.conditional else None, torch.device("cpu"), distributed=False)
    return str(local_checkpoint(path, task, 1, num_classes if spec.model.conditional else None))


@pytest.fixture(scope="module")
def cgan_ckpt(tmp_path_factory):
    return _ckpt(tmp_path_factory.mktemp("cgan") / "checkpoint_000001", "cgan_digits.yaml")


def _generated(folder, ckpt, n, part_size=100, seed=3):
    """A `rayganx generate` folder, written part by part as its actors do (no Ray needed here)."""
    g, gspec, classes = generate.load(ckpt, None)
    plan = generate.Plan(ckpt, n, seed, None, part_size)
    out = Store(str(folder))
    generate.claim(out, plan)
    for p in range(plan.parts):
        out.write_bytes(generate.make_part(g, gspec, plan, p, classes), generate.part_name(p))
    return str(folder)


def _cnn(tmp_path, generator=None, fraction=0.5, **data):
    syn = {"synthetic": {"generator": generator, "fraction": fraction}} if generator else {}
    return jobspec.from_dict({"name": "cnn_syn", "model": {"kind": "cnn", "ndf": 8},
                              "data": {"labels": True, **syn, **data},
                              "train": {"steps": 8, "batch_size": 32, "log_every": 2},
                              "scaling": {"num_workers": 1},
                              "storage": {"path": str(tmp_path / "runs"), "checkpoint_every": 8}}, "job.yaml")


# --------------------------------------------------------------------------- refused before anything runs


def test_spec_rules():
    with pytest.raises(jobspec.SpecError) as e:
        jobspec.load(JOBS / "dcgan_digits.yaml", ["data.synthetic.generator=g", "data.synthetic.fraction=0.5"])
    assert str(e.value).splitlines() == [
        f"{JOBS / 'dcgan_digits.yaml'}: data.synthetic: generated labelled images train classifiers "
        f"(model.kind: cnn), not dcgan"]
    for bad, msg in ((["data.synthetic.generator=g", "data.synthetic.fraction=1"],
                      "data.synthetic.fraction: expected less than 1"),
                     (["data.synthetic.fraction=0.5"], "data.synthetic.generator: required key is missing"),
                     (["data.source=parquet", "data.path=x", "data.per_class=5"],
                      "data.per_class: supported for digits and image_folder data, not parquet")):
        with pytest.raises(jobspec.SpecError, match=msg):
            jobspec.load(JOBS / "cnn_digits.yaml", bad)
    with pytest.raises(jobspec.SpecError, match="cas .* needs a class-conditional generator"):
        jobspec.load(JOBS / "dcgan_digits.yaml", ["eval.every=10", "eval.metrics=[cas]"])


def test_per_class_is_the_first_k_of_each_class_of_the_training_split():
    d = jobspec.load(JOBS / "cnn_digits.yaml", ["data.per_class=10"]).data
    keys = rdata._digits_subset(d)
    _, labels = rdata.digits_arrays()
    assert len(keys) == rdata.count_rows(d, "train") == 100
    assert sorted(torch.bincount(torch.as_tensor(labels[keys])).tolist()) == [10] * 10
    assert not any(rdata.in_split(str(k).encode(), "val", d.val_fraction) for k in keys)  # none held out
    assert keys == rdata._digits_subset(d)  # the same every time
    assert rdata.count_rows(d, "val") == rdata.count_rows(d.model_copy(update={"per_class": None}), "val")
    assert set(keys) <= set(rdata._digits_subset(d.model_copy(update={"per_class": 50})))


def test_per_class_on_an_image_folder(tmp_path):
    prepare_digits(str(tmp_path / "digits"), "folder", size=8)
    d = jobspec.from_dict({"name": "f", "model": {"kind": "cnn"}, "train": {"steps": 1},
                           "data": {"source": "image_folder", "path": str(tmp_path / "digits"), "labels": True,
                                    "image_size": 8, "per_class": 5}}).data
    files = rdata.image_files(d, "train").paths
    assert rdata.count_rows(d, "train") == len(files) == 50
    assert sorted({f.split("/")[-2] for f in files}) == [str(c) for c in range(10)]
    held_out = set(rdata.image_files(d.model_copy(update={"per_class": None}), "val").paths)
    assert held_out and not held_out & set(files)


def test_missing_unconditional_or_mismatched_generators_fail_in_one_line(tmp_path, cgan_ckpt):
    dcgan = _ckpt(tmp_path / "dcgan" / "checkpoint_000001", "dcgan_digits.yaml")
    cases = [
        (str(tmp_path / "nothing"), "does not exist"),
        (dcgan, "is an unconditional generator (model.conditional: false)"),
        (_ckpt(tmp_path / "c64" / "checkpoint_000001", "cgan_digits.yaml", "data.image_size=64"),
         "makes 64 px images with 1 channel(s), this job trains on 32 px with 1"),
        (_generated(tmp_path / "uncond_parts", dcgan, 50), "made by an unconditional generator (label -1)"),
        (_generated(tmp_path / "few", cgan_ckpt, 50), "holds 50 images; data.synthetic.fraction=0.5 of this "
                                                       "job's training data needs its first 100"),
    ]
    for generator, msg in cases:
        spec = runner.resolve_paths(_cnn(tmp_path, generator, per_class=10))
        with pytest.raises(jobspec.SpecError) as e:
            runner.plan(spec)
        assert msg in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
        assert str(e.value).startswith("data.synthetic.generator: ")
    # From the command line: one red line, before Ray starts.
    job = write_job(tmp_path / "job.yaml", "cnn_digits.yaml", **tiny("refused", tmp_path / "runs"),
                    data={"labels": True, "synthetic": {"generator": dcgan, "fraction": 0.5}})
    r = rayganx("submit", job)
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "unconditional generator" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs" / "refused").exists()


def test_generated_rows_are_the_images_rayganx_generate_writes(tmp_path, cgan_ckpt):
    spec = _cnn(tmp_path, cgan_ckpt, 0.25)
    src = synthetic.check(spec, 30, 10)
    assert (src.kind, src.rows, src.seed) == ("generator", 10, spec.train.seed)
    made = synthetic._make({"id": list(range(10))}, url=cgan_ckpt, endpoint_url=None, seed=0, n=10)
    assert made["label"].tolist() == list(range(10)) and made["synthetic"].tolist() == [1] * 10
    import io

    import pyarrow.parquet as pq
    from PIL import Image
    import numpy as np

    g, gspec, classes = generate.load(cgan_ckpt, None)
    part = pq.read_table(io.BytesIO(generate.make_part(g, gspec, generate.Plan(cgan_ckpt, 10, 0), 0, classes)))
    pngs = [np.asarray(Image.open(io.BytesIO(b))) for b in part.column("image").to_pylist()]
    assert all((a == b[0]).all() for a, b in zip(pngs, made["image"]))


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_classifier_trains_on_generated_rows_from_s3_and_from_generate_output(tmp_path, cgan_ckpt, s3_server,
                                                                            ray_session):
    # The checkpoint on object storage, read by the Ray Data tasks that make the rows.
    remote = "s3://rayganx-test/synthetic/cgan/checkpoint_000001"
    store = Store(remote, s3_server)
    for f in sorted(p for p in __import__("pathlib").Path(cgan_ckpt).iterdir()):
        store.write_bytes(f.read_bytes(), f.name)
    spec = _cnn(tmp_path, remote, 0.5, per_class=10, endpoint_url=s3_server)
    result = runner.run(spec)
    rows = [m for m in read_metrics(Store(result.run_url)) if "synthetic_share" in m]
    assert len(rows) == 4 and result.steps == 8
    # 100 real rows + 100 generated, shuffled together: about half of every batch is generated.
    share = sum(m["synthetic_share"] for m in rows) / len(rows)
    assert 0.3 < share < 0.7, rows
    # Validation stays real: every held-out digit, and nothing else.
    assert rows[-1]["val_images"] == rdata.count_rows(spec.data, "val")

    # A `rayganx generate` folder: its first 34 images make a quarter of the 100 real rows' set.
    folder = _generated(tmp_path / "parts", cgan_ckpt, 60, part_size=25)
    spec = _cnn(tmp_path, folder, 0.25, per_class=10).model_copy(update={"name": "cnn_syn_parts"})
    p = runner.plan(runner.resolve_paths(spec))
    assert (p.synthetic.kind, p.synthetic.rows, p.rows) == ("generated", 33, 133)
    result = runner.run(spec)
    rows = [m for m in read_metrics(Store(result.run_url)) if "synthetic_share" in m]
    assert 0.05 < sum(m["synthetic_share"] for m in rows) / len(rows) < 0.5, rows
    counted = synthetic.dataset(spec, p.synthetic).count()
    assert counted == 33


@pytest.mark.slow
def test_cas_on_a_tiny_conditional_run_from_the_cli(tmp_path, ray_session, on_head):
    job = write_job(tmp_path / "cgan.yaml", "cgan_digits.yaml", **tiny("cgan_tiny", tmp_path / "runs", steps=4),
                    model={"ngf": 8, "ndf": 8}, data={"labels": True, "per_class": 10},
                    scaling={"num_workers": 1})
    result = runner.run(jobspec.load(job))
    ckpt = result.checkpoints[-1]["url"]
    r = rayganx("eval", ckpt, "--metrics", "cas", "--cas-steps", "150", "--json", tmp_path / "cas.json", env=on_head)
    assert r.returncode == 0, r.stderr
    scores = json.loads((tmp_path / "cas.json").read_text())
    assert 0.0 <= scores["cas"] <= 1.0 and 0.0 <= scores["cas_real"] <= 1.0
    # The reference row: the same CNN on the 100 real training digits does far better than chance.
    assert scores["cas_real"] > 0.6, scores
    assert "cas_real" in r.stdout and "warning" not in r.stderr  # per_class: the held-out digits stayed out
    # An unconditional generator is refused in one line, before any work.
    dcgan = _ckpt(tmp_path / "dcgan" / "checkpoint_000001", "dcgan_digits.yaml")
    r = rayganx("eval", dcgan, "--metrics", "cas")
    assert r.returncode == 1 and "cas (Classification Accuracy Score) needs a class-conditional generator" in r.stderr
    assert r.stderr.count("error:") == 1, r.stderr


def test_cas_of_an_untrained_generator_is_near_chance(cgan_ckpt):
    # A CAS classifier trained on an untrained generator's images has nothing to learn the classes
    # from: near chance on the real held-out digits, while the same recipe on the real rows is far
    # above it (a CAS that trained on the real rows by mistake would score like cas_real).
    from rayganx.evaluation import metrics
    from rayganx.models import trained
    from rayganx.store.runs import load_state
    from rayganx.job.sections import DataSpec

    g, spec, classes = trained.generator_from_state(load_state(cgan_ckpt))
    d = DataSpec(source="digits", labels=True, image_size=spec.data.image_size)
    real = {split: tuple(torch.from_numpy(a) for a in rdata.digits_images(d, split)) for split in ("train", "val")}
    scores = metrics.classification_accuracy_score(g, spec, classes, real, steps=60)
    assert scores["cas"] < 0.25 and scores["cas_real"] > 0.8, scores
