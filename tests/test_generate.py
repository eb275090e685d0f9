"""`rayganx generate`: Parquet parts written by Ray Data actors, reproducible and resumable."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rayganx.data import generate
from rayganx.job import spec as jobspec
from rayganx.store.storage import Store
from tests.conftest import JOBS, local_checkpoint, rayganx

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cgan_ckpt(tmp_path_factory):
    """An (untrained) conditional generator's checkpoint, as a run writes it."""
    from rayganx.training.tasks import GANTask

    spec = jobspec.load(JOBS / "cgan_digits.yaml", ["model.ngf=8", "model.ndf=8"])
    torch.manual_seed(0)
    task = GANTask(spec, 10, torch.device("cpu"), distributed=False)
    return str(local_checkpoint(tmp_path_factory.mktemp("cgan") / "checkpoint_000010", task, 10, 10))


def read_parts(store: Store) -> list[dict]:
    rows = []
    for f in sorted(store.listdir(), key=lambda f: f["name"]):
        if f["name"].endswith(".parquet"):
            with store.fs.open(f["name"], "rb") as fh:
                rows += pq.read_table(fh).to_pylist()
    return rows


def test_generate_to_s3_across_two_workers_then_a_rerun_writes_nothing(cgan_ckpt, s3_server, on_head):
    out_url = "s3://rayganx-test/generated/cgan"
    env = {"AWS_ENDPOINT_URL": s3_server, **on_head}
    r = rayganx("generate", cgan_ckpt, "--n", "250", "--part-size", "60", "--workers", "2", "--labels", "3,7",
                "--seed", "5", "--out", out_url, env=env)
    assert r.returncode == 0, r.stderr
    assert "250 images in 5 parts" in r.stdout and "5 written now, 0 already there" in r.stdout, r.stdout
    store = Store(out_url, s3_server)
    rows = read_parts(store)
    assert len(rows) == 250
    seeds = [row["seed"] for row in rows]
    assert sorted(seeds) == [5 * 2 ** 32 + i for i in range(250)]  # distinct, one per image
    seeds = sorted(seeds)
    assert {row["label"] for row in rows} == {3, 7}
    im = Image.open(io.BytesIO(rows[0]["image"]))
    assert im.size == (32, 32) and im.mode == "L"
    # The folder is a Parquet dataset as it is: pandas reads it whole (the manifest's leading "_" is skipped).
    import pandas as pd

    frame = pd.read_parquet(out_url, storage_options={"client_kwargs": {"endpoint_url": s3_server}})
    assert len(frame) == 250 and sorted(frame["seed"]) == seeds and store.exists(generate.MANIFEST)

    # The same images again from the seeds alone, whichever worker made them.
    g, spec, n_cls = generate.load(cgan_ckpt, None)
    plan = generate.Plan(cgan_ckpt, 250, 5, (3, 7), 60)
    again = pq.read_table(io.BytesIO(generate.make_part(g, spec, plan, 2, n_cls))).to_pylist()
    assert [a["image"] for a in again] == [row["image"] for row in rows if row["seed"] in {a["seed"] for a in again}]

    # A lost part is remade; the others are left alone.
    store.fs.rm(store.path("part-000001.parquet"))
    before = {f["name"]: f.get("LastModified") or f.get("mtime") for f in store.listdir()}
    r = rayganx("generate", cgan_ckpt, "--n", "250", "--part-size", "60", "--workers", "2", "--labels", "3,7",
                "--seed", "5", "--out", out_url, env=env)
    assert r.returncode == 0 and "1 written now, 4 already there" in r.stdout, r.stdout + r.stderr
    after = {f["name"]: f.get("LastModified") or f.get("mtime") for f in store.listdir()}
    assert all(after[k] == v for k, v in before.items()), "a finished part was rewritten"
    assert len(read_parts(store)) == 250

    # Other settings into the same place are refused, naming what differs.
    r = rayganx("generate", cgan_ckpt, "--n", "300", "--part-size", "60", "--labels", "3,7", "--seed", "5",
                "--out", out_url, env=env)
    assert r.returncode == 1 and "holds another generation (n 250 there, 300 now)" in r.stderr, r.stderr


def test_bad_labels_fail_in_one_line(cgan_ckpt, tmp_path):
    r = rayganx("generate", cgan_ckpt, "--n", "4", "--labels", "12", "--out", tmp_path / "g")
    assert r.returncode == 1 and "--labels: 12 is not a class of this generator (0..9)" in r.stderr, r.stderr
    r = rayganx("generate", cgan_ckpt, "--n", "4", "--labels", "x", "--out", tmp_path / "g")
    assert r.returncode == 1 and "expected a comma list of class numbers" in r.stderr
    assert "Traceback" not in r.stderr
    # Nothing but (at most) the manifest was written for a refused run.
    assert not list((tmp_path / "g").glob("*.parquet"))


def test_unconditional_generator_labels_minus_one(tmp_path):
    from rayganx.training.tasks import GANTask

    spec = jobspec.load(JOBS / "dcgan_digits.yaml", ["model.ngf=8", "model.ndf=8"])
    task = GANTask(spec, None, torch.device("cpu"), distributed=False)
    ckpt = str(local_checkpoint(tmp_path / "checkpoint_000001", task, 1))
    g, spec, n_cls = generate.load(ckpt, None)
    plan = generate.Plan(ckpt, 5, 0, None, 5)
    rows = pq.read_table(io.BytesIO(generate.make_part(g, spec, plan, 0, n_cls))).to_pylist()
    assert [r["label"] for r in rows] == [-1] * 5 and len({r["image"] for r in rows}) == 5
    with pytest.raises(jobspec.SpecError, match="not a conditional generator"):
        generate.check(generate.Plan(ckpt, 5, 0, (1,), 5), spec, n_cls)
    assert np.asarray(Image.open(io.BytesIO(rows[0]["image"]))).shape == (32, 32)
