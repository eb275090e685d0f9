"""Sanity properties of the evaluation metrics that a wrong implementation fails."""

import numpy as np
import pytest
import torch

from rayganx.data import sources as rdata
from rayganx.evaluation import extractors as ex
from rayganx.evaluation import metrics as m
from rayganx.job.sections import EvalSpec
from rayganx.job.spec import from_dict
from tests.conftest import JOBS, local_checkpoint, rayganx


def digits(size=32):
    from rayganx.job.sections import DataSpec

    images, labels = rdata.digits_images(DataSpec(image_size=size))
    return rdata.model_input(torch.from_numpy(images)), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    """A digits CNN trained in-process by rayganx's own classifier task, saved as a checkpoint."""
    from rayganx.training.tasks import ClassifierTask

    spec = from_dict({"name": "cnn", "model": {"kind": "cnn", "ndf": 16}, "data": {"labels": True},
                      "train": {"steps": 300, "batch_size": 64}, "scaling": {"num_workers": 1}})
    x, y = digits()
    torch.manual_seed(0)
    task = ClassifierTask(spec, 10, torch.device("cpu"), distributed=False)
    for it in range(300):
        idx = torch.randint(0, len(x), (64,))
        task.step(x[idx], y[idx], it, it, 300)
    return str(local_checkpoint(tmp_path_factory.mktemp("cnn") / "checkpoint_000300", task, 300, 10))


@pytest.fixture(scope="module")
def random_feats():
    x, _ = digits()
    return m.features_of(ex.RandomCNN(1), x)[0]


def test_fid_kid_real_vs_real_near_zero_and_far_below_noised(random_feats):
    x, _ = digits()
    ext = ex.RandomCNN(1)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    a, b = random_feats[perm[:898]], random_feats[perm[898:1796]]
    noised = m.features_of(ext, (x[perm[898:1796]] + 0.5 * torch.randn(898, 1, 32, 32, generator=gen)).clamp(-1, 1))[0]
    fid_same, fid_noise = m.fid(a, b), m.fid(a, noised)
    kid_same, kid_noise = m.kid(a, b), m.kid(a, noised)
    assert fid_same < 0.1 * fid_noise and kid_same < 0.1 * kid_noise, (fid_same, fid_noise, kid_same, kid_noise)
    assert abs(kid_same) < 0.01


def test_fid_grows_with_noise(random_feats):
    x, _ = digits()
    ext = ex.RandomCNN(1)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=gen)
    scores = [m.fid(random_feats, m.features_of(ext, (x + s * noise).clamp(-1, 1))[0]) for s in (0.05, 0.2, 0.5, 1.0)]
    assert scores == sorted(scores) and scores[0] < scores[-1] / 5, scores


def test_inception_score_with_the_digits_classifier(classifier_ckpt):
    ext = ex.load_extractor(EvalSpec(features="classifier", extractor=classifier_ckpt), channels=1)
    x, _ = digits()
    _, logits = m.features_of(ext, x)
    assert (logits.argmax(1) == digits()[1]).float().mean() > 0.95  # a working classifier
    assert m.inception_score(logits) > 8.0  # close to the 10 classes
    _, one = m.features_of(ext, x[:1].repeat(500, 1, 1, 1))
    assert m.inception_score(one) == pytest.approx(1.0, abs=0.05)


def test_precision_recall_of_a_collapsed_generator(random_feats):
    x, labels = digits()
    real = random_feats[:900]
    # a generator collapsed to one mode: the same realistic image every time
    collapsed = m.features_of(ex.RandomCNN(1), x[3:4].repeat(200, 1, 1, 1))[0]
    p, r = m.precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.1, (p, r)
    p_all, r_all = m.precision_recall(real, random_feats[900:1800])  # a held-out real set covers the data
    assert r_all > 0.5 and r_all > 5 * r, (p_all, r_all)


def test_missing_or_unreadable_extractor(tmp_path):
    with pytest.raises(m.EvalError, match="eval.extractor: .*does not exist"):
        ex.load_extractor(EvalSpec(features="classifier", extractor=str(tmp_path / "nope")), 1)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(m.EvalError, match="eval.extractor: cannot load"):
        ex.load_extractor(EvalSpec(features="torchscript", extractor=str(bad), extractor_sha256=sha256(bad)), 1)


def sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_torchscript_extractor_follows_the_stylegan_calling_convention(tmp_path):
    class Detector(torch.nn.Module):  # the interface of StyleGAN2-ADA's inception-2015-12-05.pt
        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert img.dtype == torch.uint8 and img.shape[1] == 3
            f = img.float().mean(dim=(2, 3))
            return f if return_features else f.softmax(1)

    path = tmp_path / "detector.pt"
    torch.jit.script(Detector()).save(str(path))
    ext = ex.load_extractor(EvalSpec(features="torchscript", extractor=str(path), extractor_sha256=sha256(path)), 1)
    feats = ext(torch.zeros(2, 1, 8, 8))
    assert feats.shape == (2, 3) and torch.allclose(feats, torch.full((2, 3), 128.0))


def test_a_torchscript_extractor_loads_only_when_its_checksum_is_pinned(tmp_path):
    class Detector(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return img.float().mean(dim=(2, 3))

    path = tmp_path / "detector.pt"
    torch.jit.script(Detector()).save(str(path))
    with pytest.raises(m.EvalError, match=f"eval.extractor_sha256: required .* has SHA-256 {sha256(path)}"):
        ex.load_extractor(EvalSpec(features="torchscript", extractor=str(path)), 1)
    with pytest.raises(m.EvalError, match=f"has SHA-256 {sha256(path)}, expected 0{{64}}"):
        ex.load_extractor(EvalSpec(features="torchscript", extractor=str(path), extractor_sha256="0" * 64), 1)


def test_chunks_split_across_workers_reassemble_to_the_single_process_set():
    spec = from_dict({"name": "x", "model": {"ngf": 8, "ndf": 8}, "train": {"steps": 1}})
    from rayganx.models.networks import build

    g = build(spec)["g"].eval()
    ext = ex.RandomCNN(1)
    one = m.assemble([m.generated_features(g, spec, None, ext, 600, seed=0)])[0]
    two = m.assemble([m.generated_features(g, spec, None, ext, 600, seed=0, rank=r, world=2) for r in (0, 1)])[0]
    assert one.shape == (600, 256) and torch.equal(one, two)


def test_training_evaluates_keeps_best_and_cli_matches_the_two_worker_value(ray_session, on_head, tmp_path,
                                                                            monkeypatch):
    """Evaluation inside a 2-worker run equals `rayganx eval` (one process) on the same checkpoint;
    the checkpoint kept is the best, here an older one than the newest."""
    import json

    from rayganx.training import runner
    from rayganx.job import spec as jobspec
    from rayganx.store.runs import list_checkpoints, read_metrics
    from rayganx.store.storage import Store
    from tests.conftest import tiny, write_job

    # At step 3 every learning rate jumps to 0.5 (the divergence guard off): the generator gets worse,
    # so the best FID is an early checkpoint's, not the newest (training is deterministic: every run).
    monkeypatch.setenv("RAYGANX_FAULT_LR_AT", "3:0.5")
    job = write_job(tmp_path / "ev.yaml", "dcgan_digits.yaml", **tiny("ev", tmp_path / "runs", steps=6),
                    eval={"every": 2, "num_samples": 500, "metrics": ["fid", "kid"], "features": "random"})
    spec = jobspec.load(job, ["storage.keep_best_by=fid", "storage.keep=1", "storage.checkpoint_every=2",
                              "train.max_grad_norm=1e9"])
    runner.run(spec)
    run = Store(spec.run_url)
    history = {m["step"]: m for m in read_metrics(run)}
    assert "kid" in history[4] and 0 < history[2]["fid"] < min(history[4]["fid"], history[6]["fid"]), history
    kept = [c["step"] for c in list_checkpoints(run)]
    # keep 1 by FID: the best (step 2) and the newest, which Ray always keeps; not step 4
    assert kept == [2, 6], kept
    best = 2
    assert list((tmp_path / "runs" / "_stats").glob("real_*.pt"))  # real statistics cached in storage

    r = rayganx("eval", run.path(f"checkpoint_{best:06d}"), "--metrics", "fid,kid", "--num-samples", "500",
                "--json", tmp_path / "ev.json", env=on_head, timeout=300)
    assert r.returncode == 0, r.stderr
    single = json.loads((tmp_path / "ev.json").read_text())
    assert single["fid"] == pytest.approx(history[best]["fid"], rel=1e-5)
    assert single["kid"] == pytest.approx(history[best]["kid"], rel=1e-4, abs=1e-7)


def test_missing_extractor_fails_before_training(tmp_path):
    from tests.conftest import JOBS, rayganx

    r = rayganx("submit", JOBS / "dcgan_digits.yaml", "--set", "eval.every=2", "--set", "eval.features=classifier",
                "--set", f"eval.extractor={tmp_path}/cnn/checkpoint_000400", "--set", f"storage.path={tmp_path}")
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: eval.extractor: {tmp_path}/cnn/checkpoint_000400 does not exist"


def test_training_with_is_needs_an_extractor_with_logits():
    from rayganx.job.spec import SpecError

    job = {"name": "x", "train": {"steps": 4}, "eval": {"every": 2, "metrics": ["fid", "is"]}}
    with pytest.raises(SpecError, match="'is' .* which 'random' features lack"):
        from_dict(job)
    spec = from_dict({**job, "eval": {**job["eval"], "features": "inception"}})  # Inception's own logits serve
    assert spec.eval.features == "inception" and spec.eval.inception_path is None


def test_metrics_raise_no_library_warnings(random_feats):
    import warnings

    a, b = random_feats[:300], random_feats[300:600]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.compute(["fid", "kid", "is", "pr"], a, b, torch.randn(300, 10))
    assert [str(w.message) for w in caught] == []


def test_cli_shows_library_warnings_only_with_verbose(monkeypatch, capsys):
    import warnings

    from rayganx.cli import base as cli
    from torchmetrics.image.kid import KernelInceptionDistance

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    cli.route_library_warnings()
    warnings.simplefilter("always")
    seen = {}
    for verbose in (False, True):
        monkeypatch.setitem(cli.STATE, "verbose", verbose)
        KernelInceptionDistance(feature=m._Precomputed(4))  # torchmetrics warns about its feature buffer
        warnings.warn_explicit("the job asks for something odd", UserWarning, m.__file__, 1)
        seen[verbose] = capsys.readouterr().err
    assert "will save all extracted features" not in seen[False]
    assert "warning: the job asks for something odd" in seen[False]  # rayganx's own: always shown
    assert "UserWarning" in seen[True] and "will save all extracted features" in seen[True]


# --------------------------------------------------------------------------- `rayganx eval` as documented

from tests.test_inception import stand_in_weights  # noqa: E402,F401  (a fixture: the FID Inception's stand-in)


def dcgan_checkpoint(storage) -> str:
    """A digits DCGAN checkpoint whose job stores into `storage`; untrained (scores need not be good)."""
    import yaml

    from rayganx.training.tasks import GANTask
    from tests.conftest import JOBS

    raw = yaml.safe_load((JOBS / "dcgan_digits.yaml").read_text())
    raw["storage"]["path"] = str(storage)
    torch.manual_seed(0)
    task = GANTask(from_dict(raw), None, torch.device("cpu"), distributed=False)
    return str(local_checkpoint(storage / "dcgan_digits" / "checkpoint_001200", task, 1200))


def readme_eval_example() -> list[str]:
    """The README's `rayganx eval` line, as a user copies it: the arguments after `rayganx`."""
    import shlex

    from tests.conftest import ROOT

    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("rayganx eval ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("#")[0])[1:]


@pytest.mark.slow  # a minute and a half: the full-size Inception (stand-in weights) over every digit
def test_the_readme_eval_example_scores_all_four_metrics(stand_in_weights, tmp_path):  # noqa: F811
    import json

    from tests.conftest import rayganx

    weights, sha = stand_in_weights
    args = [dcgan_checkpoint(tmp_path / "runs") if a == "CHECKPOINT" else a for a in readme_eval_example()]
    assert "--metrics" in args and args[args.index("--metrics") + 1] == "fid,kid,is,pr"
    assert args[0] == "eval"
    r = rayganx(*args, "--num-samples", "40", "--json", tmp_path / "scores.json", timeout=600,
                env={"RAYGANX_INCEPTION_PATH": str(weights), "RAYGANX_INCEPTION_SHA256": sha,
                     "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    for key in ("fid", "kid", "is", "precision", "recall"):
        assert np.isfinite(scores[key]), (key, scores)
    assert scores["is"] >= 1.0
    # Only rayganx speaks: here, its note that the test's stand-in weights are not the standard ones.
    note = "warning: RAYGANX_INCEPTION_SHA256 is set"
    other = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(note)]
    assert other == [], r.stderr


def test_is_without_class_logits_is_refused_before_any_work(tmp_path):
    from tests.conftest import rayganx

    ckpt = dcgan_checkpoint(tmp_path / "runs")  # its job evaluates with random features (the default)
    r = rayganx("eval", ckpt, "--metrics", "fid,kid,is,pr", timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip() == ("error: eval.metrics: 'is' (Inception Score) needs class logits, which 'random' "
                                "features lack; use features inception, or classifier with a rayganx CNN checkpoint "
                                "as the extractor")
    assert not (tmp_path / "runs" / "_stats").exists()  # no real-data features were computed first


def test_real_features_of_some_classes_are_never_those_of_the_whole_dataset_from_the_cache(ray_session, tmp_path):
    # FID on digits 5-9 against the cached features of all ten digits would score a generator of
    # five classes against ten: the cache is keyed by the rows chosen, not only by the dataset.
    from rayganx.evaluation.extractors import RandomCNN
    from rayganx.evaluation.scoring import real_features
    from rayganx.job import spec as jobspec

    extractor = RandomCNN(channels=1)
    whole = jobspec.load(JOBS / "dcgan_digits.yaml", [f"storage.path={tmp_path}"])
    some = jobspec.load(JOBS / "dcgan_digits.yaml", [f"storage.path={tmp_path}", "data.classes=[5, 6, 7, 8, 9]"])
    all_ten = real_features(whole, extractor, 200)
    five = real_features(some, extractor, 200)
    assert all_ten.shape == five.shape and not torch.equal(all_ten, five)
    assert torch.equal(real_features(some, extractor, 200), five)  # and each is still cached
    assert len(list((tmp_path / "_stats").iterdir())) == 2
