"""`rayganx complete`: masks, the latent search on a case with a known answer, blending, the
baselines, and the command end to end on local paths and object storage."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rayganx.apps import complete, inpaint
from rayganx.models import networks, trained
from rayganx.job import spec as jobspec
from rayganx.job.spec import SpecError
from tests.conftest import JOBS, local_checkpoint, rayganx


# --------------------------------------------------------------------------- masks


def test_mask_parsing():
    assert inpaint.parse_mask("center", 32) == inpaint.Mask("center")
    assert inpaint.parse_mask("random", 32) == inpaint.Mask("random", fraction=0.8)
    assert inpaint.parse_mask("random:0.5", 32).fraction == 0.5
    assert inpaint.parse_mask("box:0,4,8,10", 32) == inpaint.Mask("box", box=(0, 4, 8, 10))

    hole = inpaint.synthetic_hole(inpaint.Mask("center"), 32, 0, "a")
    assert hole.shape == (1, 32, 32) and hole.sum() == 16 * 16 and hole[0, 8:24, 8:24].all()
    hole = inpaint.synthetic_hole(inpaint.Mask("box", box=(0, 4, 8, 10)), 32, 0, "a")
    assert hole.sum() == 80 and hole[0, 4:14, 0:8].all()
    a = inpaint.synthetic_hole(inpaint.Mask("random"), 32, 0, "a")
    assert 0.75 < a.mean() < 0.85
    assert (a == inpaint.synthetic_hole(inpaint.Mask("random"), 32, 0, "a")).all()  # its own seed
    assert (a != inpaint.synthetic_hole(inpaint.Mask("random"), 32, 0, "b")).any()


def test_weighted_context_counts_the_pixels_around_the_hole_only():
    known = 1 - torch.from_numpy(inpaint.synthetic_hole(inpaint.Mask("center"), 32, 0, "a"))[None]
    w = inpaint.context_weights(known)[0, 0]
    assert (w[8:24, 8:24] == 0).all()  # the hole itself
    assert (w[:5] == 0).all() and (w[:, :5] == 0).all()  # more than 3 pixels from the hole: Yeh's 7x7 window
    ring = w[5:8, 8:24]  # the 3 rows above the hole: nearer rows see more of it
    assert (ring > 0).all() and (ring[2] > ring[1]).all() and (ring[1] > ring[0]).all()
    assert torch.equal(inpaint.context_weights(known, "uniform"), known)
    # A random mask leaves every known pixel some missing neighbours: no known pixel is ignored.
    known = 1 - torch.from_numpy(inpaint.synthetic_hole(inpaint.Mask("random"), 32, 0, "a"))[None]
    w = inpaint.context_weights(known)
    assert (w[known.bool()] > 0).all() and (w[~known.bool()] == 0).all()


def test_the_commands_defaults_are_the_searchs():
    import inspect

    from rayganx.cli.generators import complete_cmd

    params = inspect.signature(complete_cmd).parameters
    search = inpaint.Search()
    for name in ("steps", "restarts", "prior", "context"):
        assert params[name].default.default == getattr(search, name), name


@pytest.mark.parametrize("text,message", [
    ("box:20,20,16,16", "the box reaches outside the 32x32 image"),
    ("box:-1,0,4,4", "reaches outside"),
    ("box:0,0,0,5", "the box has no area"),
    ("box:0,0,32,32", "covers the whole image: no known pixels"),
    ("box:1,2,3", "expected box:x,y,w,h"),
    ("random:1.5", "the missing fraction must be between 0 and 1"),
    ("/no/such/masks", "not center, random, box:x,y,w,h or a folder of mask images"),
])
def test_bad_masks_are_refused(text, message):
    with pytest.raises(SpecError, match=message):
        inpaint.parse_mask(text, 32)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_mask_images_are_checked():
    m = np.zeros((32, 32))
    m[4:8, 4:8] = 255
    assert inpaint.read_hole(png(m), 32, "m.png").sum() == 16
    with pytest.raises(SpecError, match="m.png is 16x16, the images are 32x32"):
        inpaint.read_hole(png(np.full((16, 16), 255)), 32, "m.png")
    with pytest.raises(SpecError, match="m.png has no hole"):
        inpaint.read_hole(png(np.zeros((32, 32))), 32, "m.png")
    with pytest.raises(SpecError, match="all hole"):
        inpaint.read_hole(png(np.full((32, 32), 255)), 32, "m.png")
    with pytest.raises(SpecError, match="not an image"):
        inpaint.read_hole(b"nope", 32, "m.png")


# --------------------------------------------------------------------------- blending, baselines


def test_blend_keeps_known_pixels_and_leaves_no_seam():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    hole = torch.zeros(3, 1, 16, 16)
    hole[:, :, 4:12, 4:12] = 1
    # A fill that is right up to a brightness offset: Poisson blending removes the offset exactly.
    for how in inpaint.BLENDS:
        done = inpaint.blend(x - 0.3, x, 1 - hole, how)
        assert torch.equal(done[hole.expand_as(x) == 0], x[hole.expand_as(x) == 0]), how
    done = inpaint.blend(x - 0.3, x, 1 - hole, "poisson")
    assert (done - x).abs().max() < 1e-3
    feather = inpaint.blend(x - 0.3, x, 1 - hole, "feather")
    assert (feather - x).abs().max() < 0.05
    assert (inpaint.blend(x - 0.3, x, 1 - hole, "none") - x).abs().max() > 0.29


def test_baselines():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    ref = torch.cat([torch.rand(5, 1, 8, 8) * 2 - 1, x[2:3]])
    hole = torch.zeros(4, 1, 8, 8)
    hole[:, :, 2:6, 2:6] = 1
    _, idx = inpaint.fill_nearest(x, 1 - hole, ref)
    assert idx[2] == 5
    done, labels = inpaint.complete_batch(x, hole, "mean", how="none")  # the flat fill itself
    known = (1 - hole).expand_as(x).bool()
    assert torch.equal(done[known], x[known]) and labels is None
    assert torch.allclose(done[0, 0, 3, 3], x[0][known[0]].mean(), atol=1e-5)
    with pytest.raises(SpecError, match="--method 'median': expected one of model, mean, nearest"):
        inpaint.complete_batch(x, hole, "median")


# --------------------------------------------------------------------------- a known case


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A DCGAN trained for a short real run in-process (no Ray): its checkpoint folder (with D)
    and its exported generator."""
    from rayganx.data.sources import digits_arrays
    from rayganx.training.tasks import GANTask

    spec = jobspec.load(JOBS / "dcgan_digits.yaml", ["model.ngf=16", "model.ndf=16"])
    torch.manual_seed(0)
    task = GANTask(spec, None, torch.device("cpu"), distributed=False)
    images, _ = digits_arrays()
    real = torch.from_numpy(images).float()[:, None].div(127.5).sub(1)
    real = torch.nn.functional.interpolate(real, size=32, mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(0)
    steps = 150
    for it in range(steps):
        task.step(real[torch.randint(len(real), (32,), generator=gen)], None, it, it, steps)
    root = tmp_path_factory.mktemp("short")
    ckpt = local_checkpoint(root / "run" / f"checkpoint_{steps:06d}", task, steps)
    exported = root / "generator.pt"
    trained.export_generator(task.state_dict() | {"spec": spec.to_dict(), "num_classes": None, "step": steps},
                            str(exported))
    return str(ckpt), str(exported)


@pytest.mark.slow
def test_gan_completion_recovers_an_image_the_generator_made(short_run):
    torch.set_num_threads(1)
    ckpt, exported = short_run
    # The export has no D (the latent prior); the checkpoint has D (D's score as the prior).
    for source in (exported, ckpt):
        model = inpaint.load_model(source)
        assert (model.d is None) == (source == exported)
        with torch.no_grad():
            x = networks.generate(model.g, torch.randn(8, model.spec.model.latent_dim,
                                                     generator=torch.Generator().manual_seed(123)))
        hole = torch.from_numpy(inpaint.synthetic_hole(inpaint.Mask("center"), 32, 0, "k"))[None].expand(8, -1, -1, -1)
        done, _ = inpaint.complete_batch(x, hole, "model", model=model, seeds=list(range(8)),
                                          search=inpaint.Search(steps=150, restarts=3, prior=0.003))
        mean, _ = inpaint.complete_batch(x, hole, "mean")
        h = hole.expand_as(x).bool()
        err_gan, err_mean = ((done - x)[h] ** 2).mean(), ((mean - x)[h] ** 2).mean()
        assert torch.equal(done[~h], x[~h])
        assert err_gan < 0.25 * err_mean, (source, float(err_gan), float(err_mean))


# --------------------------------------------------------------------------- the command


def digits_folder(root, n: int = 6):
    from rayganx.data.sources import digits_arrays

    images, labels = digits_arrays()
    for i in range(n):
        path = root / str(labels[i]) / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).resize((32, 32), Image.BICUBIC).save(path)
    return root


@pytest.fixture(scope="module")
def untrained_ckpt(tmp_path_factory):
    from rayganx.training.tasks import GANTask

    spec = jobspec.load(JOBS / "dcgan_digits.yaml", ["model.ngf=8", "model.ndf=8"])
    task = GANTask(spec, None, torch.device("cpu"), distributed=False)
    return str(local_checkpoint(tmp_path_factory.mktemp("untrained") / "checkpoint_000001", task, 1))


def test_bad_input_fails_in_one_line_and_writes_nothing(untrained_ckpt, tmp_path):
    ckpt = untrained_ckpt
    inp = digits_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    r = rayganx("complete", ckpt, "--input", inp, "--mask", "box:30,30,8,8", "--out", out)
    assert r.returncode == 1 and "--mask box:30,30,8,8: the box reaches outside the 32x32 image" in r.stderr, r.stderr
    r = rayganx("complete", ckpt, "--input", inp, "--mask", "center", "--out", out, "--method", "median")
    assert r.returncode == 1 and "--method 'median': expected one of model, mean, nearest" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for flags, message in ((["--context", "l2"], "--context 'l2': expected one of weighted, uniform"),
                           (["--prior", "-1"], "--prior -1.0: the prior's weight must be 0 or more")):
        r = rayganx("complete", ckpt, "--input", inp, "--mask", "center", "--out", out, *flags)
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()

    masks = tmp_path / "masks"
    m = np.zeros((32, 32))
    m[8:16, 8:16] = 255
    for f in sorted(inp.rglob("*.png"))[:2]:
        (masks / f.parent.name).mkdir(parents=True, exist_ok=True)
        (masks / f.parent.name / f.name).write_bytes(png(m))
    job = complete.Job(ckpt, str(inp), inpaint.parse_mask(str(masks), 32), str(out))
    with pytest.raises(SpecError, match="2 mask images for 3 input images"):
        complete.prepare(job)
    last = sorted(inp.rglob("*.png"))[2]
    (masks / last.parent.name).mkdir(parents=True, exist_ok=True)
    (masks / last.parent.name / last.name).write_bytes(png(np.zeros((32, 32))))
    with pytest.raises(SpecError, match="has no hole"):
        complete.prepare(complete.Job(ckpt, str(inp), inpaint.parse_mask(str(masks), 32), str(out)))
    (masks / last.parent.name / last.name).write_bytes(png(np.full((8, 8), 255)))
    with pytest.raises(SpecError, match="is 8x8, the images are 32x32"):
        complete.prepare(complete.Job(ckpt, str(inp), inpaint.parse_mask(str(masks), 32), str(out)))
    assert not out.exists()


@pytest.mark.slow
def test_complete_local_folder_then_a_rerun(short_run, tmp_path):
    ckpt, _ = short_run
    inp = digits_folder(tmp_path / "in", 6)
    out = tmp_path / "out"
    args = ["complete", ckpt, "--input", inp, "--mask", "center", "--out", out, "--steps", "20",
            "--batch-size", "4", "--workers", "2", "--seed", "3"]
    r = rayganx(*args)
    assert r.returncode == 0, r.stderr
    assert "completed 6 images (model)" in r.stdout and "hole PSNR" in r.stdout, r.stdout
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    expected = sorted(p.relative_to(inp).as_posix() for p in inp.rglob("*.png"))
    assert written == sorted(expected + ["grid.png"])
    first = (out / expected[0]).read_bytes()
    original = np.asarray(Image.open(inp / expected[0]))
    done = np.asarray(Image.open(io.BytesIO(first)))
    assert (done[:8] == original[:8]).all() and (done[8:24, 8:24] != original[8:24, 8:24]).any()
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 + 3 * 34, 2 + 4 * 34)  # the first task's 4 images: input with hole, completion, original
    manifest = json.loads((out / "complete.json").read_text())
    assert manifest["settings"]["mask"] == "center" and manifest["summary"]["images"] == 6
    # The same command again is safe and gives the same images (each image has its own seed).
    r = rayganx(*args)
    assert r.returncode == 0, r.stderr
    assert (out / expected[0]).read_bytes() == first
    assert not list(out.rglob(".tmp_*"))
    # Other settings into the same place are refused.
    r = rayganx(*args[:-2], "--seed", "4")
    assert r.returncode == 1 and "holds another completion (seed 3 there, 4 now)" in r.stderr, r.stderr


@pytest.mark.slow
def test_complete_parquet_on_s3_with_the_nearest_baseline(short_run, s3_server, on_head):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayganx.data.sources import digits_arrays
    from rayganx.store.storage import Store

    ckpt, _ = short_run
    images, labels = digits_arrays()
    pngs = [png(np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC))) for im in images[1:6]]
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary()), "label": labels[1:6]}), buf)
    src = Store("s3://rayganx-test/complete/in", s3_server)
    src.write_bytes(buf.getvalue(), "digits.parquet")
    out_url = "s3://rayganx-test/complete/out"
    r = rayganx("complete", ckpt, "--input", src.url, "--mask", "random", "--method", "nearest", "--out", out_url,
                "--workers", "1", env={"AWS_ENDPOINT_URL": s3_server, **on_head})
    assert r.returncode == 0, r.stderr
    assert "completed 5 images (nearest)" in r.stdout, r.stdout
    out = Store(out_url, s3_server)
    names = sorted(f["name"].rsplit("/", 1)[-1] for f in out.listdir())
    assert names == ["complete.json", "digits-000000.png", "digits-000001.png", "digits-000002.png",
                     "digits-000003.png", "digits-000004.png", "grid.png"]
    # The checkpoint's training split of digits holds these five (row 0 is held out, rows 1-5
    # are not): each is its own nearest image.
    psnr = json.loads(out.read_text("complete.json"))["summary"]["hole_psnr_db"]
    assert psnr > 40, psnr
