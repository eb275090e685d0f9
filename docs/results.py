"""Regenerate the digits section of docs/results.md: every jobs/*_digits.yaml job's default run for
several seeds, each final checkpoint scored with the digits classifier (jobs/cnn_digits.yaml) as
the feature extractor, mean ± std over seeds, and one sample grid per job under docs/img/.

    python docs/results.py                 # 5 jobs x the held-out seeds 100-104, about 80 minutes on 2 CPU cores
    python docs/results.py --jobs sngan_digits,dcgan_digits --seeds 100
    python docs/results.py --reuse         # after an interruption: keep the runs already scored
    python docs/results.py --set "data.classes=[5,6,7,8,9]" --no-write   # scored on data no search chose on
    python docs/results.py --tuned runs/tune_dcgan_as_sngan   # the sweep's best DCGAN on the held-out seeds

--tuned takes a finished `rayganx tune` folder: its leaderboard becomes a row of
docs/records/sweeps.jsonl (the seed it searched on, every trial, the best one's settings as
--sets), and its base job runs on the held-out seeds with those settings, so the table can set
a tuned recipe against a tuned baseline.

Each finished run is a row of docs/records/digits.jsonl (docs/experiments.Runs).

Nothing is downloaded: digits ship with scikit-learn and the extractor is trained first. Runs go
to results_runs/ (RAYGANX_RESULTS_STORAGE). The sections other scripts write (2-D mixtures,
completion, synthetic data) are kept as they are.
"""

from __future__ import annotations

from pathlib import Path

import experiments
from experiments import ROOT

SAMPLES = 1000
SECTION = "# Results on digits"
METRICS = ("fid", "kid", "is", "precision", "recall")


def describe(spec) -> str:
    m, t = spec.model, spec.train
    if m.kind == "vae":
        return f"VAE, Adam {t.optim.lr:g}"
    parts = ["conditional" if m.conditional else None, t.loss.replace("_", "-")]
    parts += ["SN in D" if m.spectral_norm in ("d", "both") else None,
              (f"GP {t.gp_lambda:g}" + (f" every {t.gp_every} steps" if t.gp_every > 1 else "")
               + f", {t.d_steps} D step{'s' if t.d_steps > 1 else ''} per G step") if t.gp_lambda else None,
              f"R1 {t.r1_gamma:g}" if t.r1_gamma else None,
              f"EMA {t.ema_decay:g}" if t.ema_decay else None,
              f"DiffAugment {'+'.join(t.diffaug)}" if t.diffaug else None]
    g, d = t.optim_g, t.optim_d
    lr = f"{g.lr:g}" if g.lr == d.lr else f"G {g.lr:g} / D {d.lr:g}"
    betas = tuple(g.betas)
    parts.append(f"Adam {lr}, betas ({betas[0]:g}, {betas[1]:g})")
    return ", ".join(p for p in parts if p)


def grid(g, spec, num_classes, path: Path) -> None:
    """64 samples of the final generator (a conditional one: one class per row, 8 of each)."""
    import torch

    from rayganx.models.images import grid_png
    from rayganx.models.networks import generate

    n = 80 if num_classes else 64
    z = torch.randn(n, spec.model.latent_dim, generator=torch.Generator().manual_seed(1234))
    y = torch.arange(num_classes).repeat_interleave(8) if num_classes else None
    with torch.no_grad():
        images = generate(g.eval(), z, y)
    path.write_bytes(grid_png(images, nrow=8))



def default_jobs() -> list[str]:
    """Every digits GAN or VAE job (the classifier is the extractor; sweeps are not jobs)."""
    return [p.stem for p in sorted((ROOT / "jobs").glob("*_digits.yaml"))
            if p.stem != "cnn_digits" and not p.stem.startswith(("tune_", "pbt_"))]


def write_section(rows, seeds: list[int], planned: int, no_write: bool, sets: list[str] = ()) -> None:
    lines = [
        SECTION,
        "",
        experiments.produced_by("python docs/results.py" + "".join(f" --set {x}" for x in sets), f"each run a rayganx job on 2 Ray Train workers, "
                                f"{len(seeds)} seeds per job, one run at a time") + ". Every `jobs/*_digits.yaml` job's default run; metrics of its final checkpoint (EMA generator where "
        f"the job keeps one) on {SAMPLES} samples against the digits, with the penultimate layer of the "
        "`jobs/cnn_digits.yaml` classifier as the feature extractor (its logits for the Inception Score, at most 10 "
        "here). These numbers are comparable with each other, not with Inception-based FIDs published for other "
        "datasets. Mean ± std over seeds (`train.seed` " + ", ".join(map(str, seeds)) + "). Wall time: one run from submission to its final "
        "checkpoint, Ray start-up of the workers included; the GAN jobs' budgets are set equal (about the DCGAN "
        "job's), so their FIDs compare at the same wall-clock cost.",
        "",
        "| job | recipe | steps |",
        "| --- | --- | --- |",
    ]
    lines += [f"| jobs/{job}.yaml | {describe(spec)} | {spec.train.steps} |" for job, spec, *_ in rows]
    # The figures: a table made from the records alone (docs/records.py), which tests/test_records.py
    # regenerates and compares; nothing here retypes a number.
    import records

    lines += ["", "<!-- table:digits -->", records.TABLES["digits"]().rstrip("\n"), "<!-- /table:digits -->"]
    lines += experiments.partial(len(rows), planned)
    recorded = records.load("digits")
    left = [j for j in default_jobs() if j not in {Path(r["job"]).stem for r in recorded}]
    if left:
        lines += ["", f"Not in this table (not run on these seeds yet): {', '.join(f'`{j}`' for j in left)}."]
    held_data = any(x.startswith("data.classes=") for r in recorded for x in r["sets"])
    lines += ["", "The seeds are held out: no search used them. Tuned against tuned: a row marked \"the best of\" a "
                  "sweep ran at the settings that sweep chose for it (docs/records/sweeps.jsonl: every trial and the "
                  "seed it searched on), and the \"vs tuned DCGAN\" column sets each recipe against DCGAN at the "
                  "settings the same sweep chose for DCGAN (`jobs/tune_dcgan_as_sngan.yaml`, the sweep that chose "
                  "the SNGAN recipe's optimiser, run for DCGAN; on held-out data, DCGAN re-tuned on the same "
                  "classes as the recipe). A row with `data.classes` and no other setting is its job as written, "
                  "set against DCGAN as written on the same classes. The shipped recipes count as tuned: their sweeps "
                  "and searches chose them. A recipe that does not beat the tuned DCGAN has no claim to a lead. "
                  "Both DCGAN columns compare unconditional GANs only, all at about DCGAN's wall time: the "
                  "conditional GAN also learns from the labels, and the VAE is another kind of model at its own "
                  "budget, so their rows stand alone."]
    lines += ["", "Rows without `data.classes` are scored on the digits every recipe was chosen on. "
                  + ("Rows with `data.classes=[5, 6, 7, 8, 9]` are scored on digits no sweep saw: their tuned "
                     "settings come from the sweeps in docs/sweeps/, searched on digits 0-4 only (the recipes' "
                     "other choices, such as loss, spectral norm and EMA, were made on all ten digits)."
                     if held_data else "`--set \"data.classes=[...]\"` scores on classes a search did not see.")]
    lines += ["", f"Seed {seeds[0]}'s samples, one grid per job (a conditional job: one class per row):", ""]
    for job, *_ in rows:
        lines += [f"**{job}**", "", f"![{job}](img/results_{job}{experiments.variant(sets)}.png)", ""]
    experiments.replace_section(SECTION, "\n".join(lines) + "\n", no_write)


def tuned_sets(folder: Path) -> tuple[str, list[str]]:
    """A finished sweep's best trial as (its base job, the --sets that make the base job that trial),
    recorded in docs/records/sweeps.jsonl with every trial and the seed it searched on."""
    import json

    import records
    import yaml

    from rayganx.job import spec as jobspec
    from rayganx.ops.compare import flatten
    from rayganx.sweeps import sweep as sweeps

    def as_set(key, value) -> str:  # KEY=VALUE as --set reads it back
        return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"

    board = json.loads((folder / "leaderboard.json").read_text())
    # the shipped sweeps, or the held-out-data ones that only these docs run
    path = next(p for p in (ROOT / "jobs" / f"{board['sweep']}.yaml", ROOT / "docs" / "sweeps" / f"{board['sweep']}.yaml")
                if p.exists())
    sweep = sweeps.load(path)
    best = jobspec.load(folder / "best_job.yaml")
    base, tuned = flatten(sweep.base.model_dump(mode="json")), flatten(best.model_dump(mode="json"))
    # what the sweep chose, not where it ran: the run's name, storage and scorer stay the table's
    sets = [as_set(k, v) for k, v in tuned.items() if v != base.get(k) and k.split(".")[0] in ("model", "train")]
    job = f"jobs/{Path(sweep.spec.job).name}"
    trials = [{k: t[k] for k in ("trial", "config", "status", "step", "best", "best_step")} for t in board["trials"]]
    for t in trials:  # the scorer's file is where the sweep ran: not part of what it chose
        t["config"] = {k: v for k, v in t["config"].items() if k != "eval.extractor"}
    times = [m["time"] for t in board["trials"] for m in map(json.loads, (
        line for part in sorted((Path(t["run"]) / "metrics").glob("part_*.jsonl"))
        for line in part.read_text().splitlines())) if "time" in m]
    searched_on = [as_set(k, v) for k, v in sweep.space.items() if k.startswith("data.")]
    records.append("sweeps", job=job, sets=sets, seed=sweep.base.train.seed, wall_s=max(times) - min(times),
                   metrics={board["metric"]: board["trials"][0]["best"]}, sweep=board["sweep"],
                   sweep_file=str(path.relative_to(ROOT)), searched_on=searched_on,
                   metric=board["metric"], mode=board["mode"], trials=trials)
    return job, sets


def main() -> None:
    ap = experiments.parser(__doc__, reuse="the scored runs (their result.json)",
                            sets=True)
    ap.add_argument("--jobs", default=None, help="comma list of jobs/<name>.yaml (default: every *_digits GAN/VAE job)")
    ap.add_argument("--tuned", type=Path, default=None,
                    help="a finished `rayganx tune` folder: record it and run its best trial's settings")
    args = ap.parse_args()
    if args.tuned:
        job, sets = tuned_sets(args.tuned)
        args.jobs, args.sets = Path(job).stem, [*sets, *args.sets]
        print(f"{args.tuned}: {job} with " + " ".join(f"--set {x}" for x in sets), flush=True)
    from rayganx.models import trained
    from rayganx.training import runner
    from rayganx.evaluation.scoring import evaluate_generator
    from rayganx.store.runs import load_state

    jobs = args.jobs.split(",") if args.jobs else default_jobs()
    runs = experiments.Runs(record="digits", reuse=args.reuse)
    cnn = runs.train(runs.job("cnn_digits.yaml", "cnn_digits", []), job="jobs/cnn_digits.yaml")
    extractor = cnn["checkpoint"]

    def score(url, spec):
        g, gspec, num_classes = trained.generator_from_state(load_state(url))
        ev = gspec.eval.model_copy(update={"features": "classifier", "extractor": extractor})
        gspec = gspec.model_copy(update={"eval": ev, "storage": spec.storage})
        return {"scores": evaluate_generator(g, runner.resolve_paths(gspec), num_classes,
                                             list(METRICS[:3]) + ["pr"], SAMPLES)}

    rows = []
    (ROOT / "docs" / "img").mkdir(exist_ok=True)
    for job in jobs:
        per_seed, walls, spec = [], [], None
        for seed in args.seeds:
            sets = [f"train.seed={seed}", *args.sets]
            spec = runs.job(f"{job}.yaml", f"{job}{experiments.variant(args.sets)}_seed{seed}", sets)
            done = runs.train(spec, lambda url: score(url, spec), job=f"jobs/{job}.yaml", sets=sets)
            scores = done["scores"]
            walls.append(done["wall_s"])
            per_seed.append(scores)
            print(f"{job} seed {seed}: " + " ".join(f"{k} {scores[k]:.4g}" for k in METRICS)
                  + f" ({done['wall_s']:.0f} s)", flush=True)
            if seed == args.seeds[0] and not args.no_write:  # the grids are the section's: --no-write keeps them
                g, gspec, num_classes = trained.generator_from_state(load_state(done["checkpoint"]))
                grid(g, gspec, num_classes if gspec.model.conditional else None,
                     ROOT / "docs" / "img" / f"results_{job}{experiments.variant(args.sets)}.png")
        rows.append((job, spec, per_seed, walls))
        write_section(rows, args.seeds, len(jobs), args.no_write, args.sets)


if __name__ == "__main__":
    main()
