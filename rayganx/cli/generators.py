"""Using a trained generator: samples, distributed generation, export, evaluation."""

from __future__ import annotations

import time
from typing import Optional

import typer
from rich.table import Table

from rayganx.job import spec as jobspec
from rayganx.cli.base import EndpointOpt, STATE, app, command, out, warn
from rayganx.store.storage import absolute


@app.command()
@command
def sample(checkpoint: str = typer.Argument(..., help="checkpoint folder (local or URL) or exported .pt"),
           n: int = typer.Option(64, "--n", help="number of images"),
           seed: int = typer.Option(0, "--seed"),
           out_png: Optional[str] = typer.Option(None, "--out", help="grid PNG to write"),
           out_dir: Optional[str] = typer.Option(None, "--out-dir", help="also write each image here"),
           endpoint_url: Optional[str] = EndpointOpt):
    """Generate images from a checkpoint's generator; no Ray cluster needed."""
    import os

    from rayganx.models import trained
    from rayganx.models.images import grid_png, png_bytes, to_uint8

    if not out_png and not out_dir:
        raise jobspec.SpecError("--out or --out-dir: say where to write the images")
    g, spec, num_classes = trained.open_generator(checkpoint, endpoint_url)
    images, per_row = trained.sample_images(g, spec, num_classes, n, seed)
    if out_png:
        with open(out_png, "wb") as f:
            f.write(grid_png(images, per_row))
        out.print(f"wrote a grid of {len(images)} images to {out_png}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for i, im in enumerate(to_uint8(images)):
            with open(os.path.join(out_dir, f"{i:05d}.png"), "wb") as f:
                f.write(png_bytes(im))
        out.print(f"wrote {len(images)} images to {out_dir}")


RayAddressOpt = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                             help="Ray cluster (what ray.init takes); default: embedded")


def cluster_address(address: str | None, command_name: str) -> str | None:
    """Commands that run Ray Data themselves join a cluster; a Jobs API URL is refused."""
    if address and address.startswith("http"):
        raise jobspec.SpecError(f"--address {address}: {command_name} joins a Ray cluster (host:6379 or "
                                f"ray://host:10001), not the Jobs API")
    return address


def work_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=out,
                    disable=not out.is_terminal)


@app.command("generate")
@command
def generate_cmd(checkpoint: str = typer.Argument(..., help="checkpoint folder (local or URL) or exported .pt"),
                 n: int = typer.Option(..., "--n", help="number of images"),
                 out_url: str = typer.Option(..., "--out", help="folder or URL for the Parquet parts"),
                 labels: Optional[str] = typer.Option(None, "--labels",
                                                      help="classes to generate in turn, e.g. 3,5 (conditional "
                                                           "generators; default: every class)"),
                 seed: int = typer.Option(0, "--seed", help="image i is drawn from seed * 2**32 + i"),
                 workers: int = typer.Option(2, "--workers", help="generator copies working at once"),
                 part_size: int = typer.Option(1000, "--part-size", help="images per Parquet part"),
                 gpu: bool = typer.Option(False, "--gpu", help="one GPU per worker"),
                 address: Optional[str] = RayAddressOpt,
                 endpoint_url: Optional[str] = EndpointOpt):
    """Write N generated images (PNG bytes, label, seed) as Parquet with Ray Data; a re-run makes only the missing parts."""
    from rayganx.data import generate
    from rayganx.job.cluster import init_ray

    try:
        classes = tuple(int(v) for v in labels.split(",") if v.strip()) if labels is not None else None
    except ValueError:
        raise jobspec.SpecError(f"--labels {labels!r}: expected a comma list of class numbers") from None
    plan = generate.Plan(checkpoint, n, seed, classes, part_size)
    todo = generate.prepare(plan, out_url, endpoint_url)  # a bad plan fails here, before Ray starts
    init_ray(address=cluster_address(address, "generate"))
    with work_bar() as bar:
        task = bar.add_task("generating", total=n)
        result = generate.run(plan, todo, out_url, endpoint_url, workers=workers, use_gpu=gpu,
                              on_part=lambda done, total: bar.update(task, completed=done))
    out.print(f"{result['images']} images in {result['parts']} parts at {result['out']} "
              f"({result['written']} written now, {result['skipped']} already there)", soft_wrap=True)


@app.command("complete")
@command
def complete_cmd(checkpoint: str = typer.Argument(..., help="checkpoint folder (local or URL) or exported .pt"),
                 input_url: str = typer.Option(..., "--input", help="folder of images or Parquet (image column), "
                                                                    "local or URL"),
                 mask: str = typer.Option(..., "--mask", help="center | random[:fraction] | box:x,y,w,h | a folder of "
                                                              "mask images (white = hole) named like the inputs"),
                 out_url: str = typer.Option(..., "--out", help="folder or URL for the completed PNGs and grid.png"),
                 method: str = typer.Option("model", "--method", help="model (GAN latent search, VAE encode-decode) "
                                                                      "| mean | nearest"),
                 steps: int = typer.Option(200, "--steps", help="latent search: Adam steps"),
                 restarts: int = typer.Option(2, "--restarts", help="latent search: starts per image (per class for "
                                                                    "a conditional model)"),
                 prior: float = typer.Option(0.0, "--prior",
                                             help="latent search: weight of the realism prior (D's score, or the "
                                                  "latent's log-density without D) against the context loss"),
                 context: str = typer.Option("weighted", "--context",
                                             help="latent search: weighted (known pixels near the hole count most, "
                                                  "Yeh et al.) | uniform"),
                 blend: str = typer.Option("poisson", "--blend", help="poisson | feather | none"),
                 seed: int = typer.Option(0, "--seed", help="random masks and latent starts (per image)"),
                 batch_size: int = typer.Option(64, "--batch-size", help="images per task"),
                 workers: int = typer.Option(2, "--workers", help="model copies working at once"),
                 threads: int = typer.Option(1, "--threads", help="CPUs (torch threads) per worker"),
                 gpu: bool = typer.Option(False, "--gpu", help="one GPU per worker"),
                 address: Optional[str] = RayAddressOpt,
                 endpoint_url: Optional[str] = EndpointOpt):
    """Fill a hole in each input image: GAN latent search (Yeh et al. 2017), VAE, or the mean / nearest baselines."""
    from rayganx.apps import complete, inpaint
    from rayganx.job.cluster import init_ray

    t0 = time.monotonic()
    # The mask is parsed for size 1 << 16 first (syntax only); prepare checks a box against the model's size.
    job = complete.Job(checkpoint, input_url, inpaint.parse_mask(mask, 1 << 16, endpoint_url), out_url, method,
                       inpaint.Search(steps, restarts, prior, context=context), blend, seed, batch_size, endpoint_url)
    complete.prepare(job)  # bad input fails here, before Ray starts or anything is written
    init_ray(address=cluster_address(address, "complete"))
    with work_bar() as bar:
        task = bar.add_task("completing", total=len(job.items))
        summary = complete.run(job, workers, threads, gpu, on_chunk=lambda done, total: bar.update(task, completed=done))
    psnr = f"; hole PSNR {summary['hole_psnr_db']:.2f} dB against the inputs" if "hole_psnr_db" in summary else ""
    out.print(f"completed {summary['images']} images ({method}) in {time.monotonic() - t0:.0f} s into {summary['out']} "
              f"(grid.png, complete.json){psnr}", soft_wrap=True, highlight=False)


@app.command()
@command
def export(checkpoint: str = typer.Argument(..., help="checkpoint folder (local or URL)"),
           out_path: str = typer.Option(..., "--out", help="file to write, e.g. generator.pt"),
           program: bool = typer.Option(True, "--pt2/--no-pt2",
                                        help="also write OUT's stem + .pt2, a torch.export program that needs torch alone"),
           endpoint_url: Optional[str] = EndpointOpt):
    """Write the generator: weights + architecture (rayganx.models.networks) and a torch.export program (torch alone)."""
    import os

    from rayganx.models import trained
    from rayganx.store.runs import load_state

    pt2 = os.path.splitext(out_path)[0] + ".pt2" if program else None
    trained.export_generator(load_state(checkpoint, endpoint_url), out_path, pt2)
    out.print(f"wrote {out_path}: load it with rayganx.models.trained.load_generator({out_path!r})")
    if pt2:
        out.print(f"wrote {pt2}: torch.export.load({pt2!r}).module() maps latent vectors to images")


@app.command("eval")
@command
def eval_cmd(checkpoint: str = typer.Argument(..., help="checkpoint folder (local or URL)"),
             metrics: Optional[str] = typer.Option(
                 None, "--metrics", help="comma list of fid, kid, is, pr, cas (images; default fid,kid) or modes, "
                                         "hq, kl (2-D mixtures, their default)"),
             num_samples: Optional[int] = typer.Option(
                 None, "--num-samples", help="default 1000; for 2-D mixtures 2500 per set (the papers' protocol)"),
             sample_sets: int = typer.Option(5, "--sample-sets", help="2-D mixtures: sets the mode metrics average over"),
             features: Optional[str] = typer.Option(None, "--features",
                                                    help="random | classifier | torchscript | inception"),
             extractor: Optional[str] = typer.Option(None, "--extractor", help="classifier checkpoint or .pt file"),
             extractor_sha256: Optional[str] = typer.Option(None, "--extractor-sha256",
                                                            help="--features torchscript: the file's SHA-256"),
             inception_path: Optional[str] = typer.Option(
                 None, "--inception-path", help="--features inception: the FID Inception weights file (else fetched "
                                                "once into the cache)"),
             seed: int = typer.Option(0, "--seed"),
             cas_steps: int = typer.Option(400, "--cas-steps", min=1,
                                           help="cas: steps of each classifier (jobs/cnn_digits.yaml's recipe: 400)"),
             json_out: Optional[str] = typer.Option(None, "--json", help="also write the results here"),
             address: Optional[str] = typer.Option(None, "--address", help="a Ray cluster to evaluate on "
                                                                         "(host:port); with --workers"),
             workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                                   help="actors that generate and extract across the cluster "
                                                        "(default: this process alone)"),
             gpu: bool = typer.Option(False, "--gpu", help="with --workers: one GPU per actor"),
             endpoint_url: Optional[str] = EndpointOpt):
    """Score a checkpoint's generator against its job's data (FID, KID, IS, precision/recall, and for
    conditional generators the Classification Accuracy Score; for 2-D mixtures the modes covered, the
    share of high-quality samples and the KL of their mode histogram)."""
    import json

    from rayganx.models import trained
    from rayganx.evaluation.scoring import evaluate_generator
    from rayganx.store.runs import load_state

    state = load_state(checkpoint, endpoint_url)
    g, spec, num_classes = trained.generator_from_state(state)
    points = spec.data.source == "gaussian_mixture"
    metrics = metrics or ("modes,hq,kl" if points else "fid,kid")
    # The papers' FID uses 50,000 samples on the standard Inception; other features default to 1,000.
    num_samples = num_samples or (2500 if points else 50_000 if (features or spec.eval.features) == "inception" else 1000)
    if (address or gpu) and not workers:
        workers = 1
    if address:
        from rayganx.job.cluster import init_ray

        init_ray(address=address, verbose=STATE["verbose"])
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    ev = {"metrics": names, "num_samples": num_samples, "sample_sets": sample_sets}
    ev |= {"features": features} if features else {}
    ev |= {"extractor": extractor} if extractor else {}
    ev |= {"extractor_sha256": extractor_sha256} if extractor_sha256 else {}
    ev |= {"inception_path": inception_path} if inception_path else {}
    spec = jobspec.from_dict(spec.to_dict() | {"eval": spec.eval.model_dump() | ev}, source=checkpoint)
    problems = jobspec.metric_problems(spec)
    if problems:
        raise jobspec.SpecError(f"--metrics: {problems[0].split(': ', 1)[1]}")
    if endpoint_url and not spec.storage.endpoint_url:
        spec.storage.endpoint_url = endpoint_url
    if endpoint_url and not spec.data.endpoint_url:
        spec.data.endpoint_url = endpoint_url
    if "cas" in names:
        from rayganx.evaluation.metrics import check_cas

        check_cas(spec, num_classes)  # one line, before Ray or any feature extraction starts
        if spec.is_gan and not spec.data.per_class:
            warn("cas: this generator trained on every image, the held-out ones the score tests on included "
                 "(GAN jobs read data.val_fraction's split only with data.per_class); the score is optimistic")
    results = evaluate_generator(g, spec, num_classes, names, num_samples, seed, verbose=STATE["verbose"],
                                 cas_steps=cas_steps, checkpoint=absolute(checkpoint), workers=workers, gpu=gpu)
    what = f"{sample_sets} sets of {num_samples} samples" if points else f"{num_samples} samples, {spec.eval.features} features"
    table = Table(title=f"{checkpoint} (step {state.get('step')}, {what})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        table.add_row(k, f"{v:.4f}")
    out.print(table)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"checkpoint": checkpoint, "step": state.get("step"), "num_samples": num_samples,
                       "features": spec.eval.features, **results}, f, indent=2)
