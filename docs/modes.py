"""The 2-D mode-collapse benchmark: train the ring and grid jobs (vanilla baselines, PacGAN and
mixture-prior recipes) for several seeds as ordinary rayganx runs, score each run's final
generator with the protocol of VEEGAN / PacGAN, and write the "2-D mixtures" section of
docs/results.md and one scatter plot per job under docs/img/.

    python docs/modes.py                 # 5 jobs x the held-out seeds 100-104; runs go to results_runs/
    python docs/modes.py --protocol pacgan   # PacGAN's own ring (radius 1, std 0.01), 10 trials
    python docs/modes.py --seeds 100 --jobs pacgan_ring   # one row, one seed
    python docs/modes.py --reuse         # after an interruption: keep the runs already scored

Each finished run is a row of docs/records/modes.jsonl (docs/experiments.Runs).

Protocol: 5 sets of 2,500 samples from the final checkpoint's generator (its EMA copy where the
job keeps one); a sample is high quality within 3 std of its nearest mode; a mode is covered by
at least one high-quality sample; KL of the high-quality samples' mode histogram against
uniform. Each seed's score is the mean over the 5 sets; the table gives mean ± std over seeds.
"""

from __future__ import annotations

from pathlib import Path

import experiments
import records
from experiments import ROOT

JOBS = ("mlp_gan_ring", "pacgan_ring", "gmgan_ring", "mlp_gan_grid", "pacgan_grid")
SECTION = "## 2-D mixtures: mode coverage"

# Published rows for the same protocol and mixtures. PacGAN, Lin et al. 2018, Table 1 (their
# ring has radius 1 and std 0.01, the same problem as ours at half the scale); VEEGAN,
# Srivastava et al. 2017, Table 1.
PUBLISHED = [
    ("GAN (PacGAN Table 1)", (6.3, 98.2), (17.3, 94.8)),
    ("PacGAN2 (PacGAN Table 1)", (7.9, 95.6), (23.8, 91.3)),
    ("PacGAN4 (PacGAN Table 1)", (7.8, 95.9), (24.8, 93.6)),
    ("VEEGAN (VEEGAN Table 1)", (8.0, 52.9), (24.6, 40.0)),
]


def describe(spec) -> str:
    m, t = spec.model, spec.train
    parts = [f"MLP {len(m.hidden)}x{m.hidden[0]}", f"z {m.latent_dim}", t.loss.replace("_", "-")]
    parts += [f"pack {m.pack}"] if m.pack > 1 else []
    parts += [f"{m.latent_components}-Gaussian prior"] if m.latent_components else []
    parts += [f"D on {m.fourier_features} Fourier features"] if m.fourier_features else []
    parts += [f"R1 {t.r1_gamma:g}" + (f" every {t.r1_every}" if t.r1_every > 1 else "")] if t.r1_gamma else []
    parts += [f"instance noise {t.instance_noise:g}"] if t.instance_noise else []
    parts += [f"EMA {t.ema_decay:g}"] if t.ema_decay else []
    lrs = {t.optim_g.lr, t.optim_d.lr}
    parts += [f"lr {'/'.join(f'{v:g}' for v in sorted(lrs))}", f"batch {t.batch_size}"]
    return ", ".join(parts)


def scatter(points, centres, std, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extent = 1.3 * abs(centres).max()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(points[:, 0], points[:, 1], s=1, c="tab:blue", alpha=0.5, linewidths=0)
    for cx, cy in centres:  # the high-quality zone of each mode
        ax.add_patch(plt.Circle((cx, cy), 3 * std, fill=False, color="tab:red", lw=0.6))
    ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", title=title)
    ax.title.set_fontsize(8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# The two papers' settings: VEEGAN's (ring radius 2, std 0.02; here 5 sets of 2,500 samples per
# run, 5 seeds) and PacGAN's own (ring radius 1, std 0.01; one set of 2,500 per trial, 10 trials).
# The grid is the same in both.
PROTOCOLS = {"veegan": {"section": SECTION, "ring": "ring", "sets": 5, "seeds": "100-104", "table": "modes"},
             "pacgan": {"section": "## 2-D mixtures: PacGAN's setting", "ring": "ring_pacgan", "sets": 1,
                        "seeds": "100-109", "table": "modes-pacgan"}}


def write_section(rows, seeds: list[int], planned: int, no_write: bool, protocol: str = "veegan",
                  sets: list[str] = ()) -> None:
    p = PROTOCOLS[protocol]
    lines = [
        p["section"],
        "",
        experiments.produced_by(f"python docs/modes.py --protocol {protocol}" + "".join(f" --set {x}" for x in sets),
                                f"each run a rayganx job with its own scaling section, seeds "
                                f"{', '.join(map(str, seeds))}") + ". Scores of each",
        f"run's final generator (the EMA copy where the job keeps one): {p['sets']} set(s) of 2,500 samples; a sample",
        "is high quality within 3 std of its nearest mode, a mode is covered by at least one high-quality",
        "sample, KL is that of the high-quality samples' mode histogram against uniform (the protocol of",
        f"VEEGAN and PacGAN). Mean ± std over seeds of the per-seed means over the {p['sets']} set(s). Even exact",
        "samples of the mixture score 98.9% high quality (1 - exp(-9/2), a 2-D Gaussian within 3 std).",
        "Width: the high-quality samples' RMS distance to their mode over the data's own (exact samples: 1.00);",
        "below 1, a generator draws narrower clusters than the data's, and part of its high quality is that.",
        ("Mixtures: ring of 8 modes on radius 2, std 0.02 (VEEGAN's)" if p["ring"] == "ring" else
         "Mixtures: ring of 8 modes on radius 1, std 0.01 (PacGAN's own)") +
        "; grid of 25 modes at {-4, -2, 0, 2, 4}², std 0.05 (both papers).",
        "Wall time: one run from submission to its final checkpoint, Ray start-up of the workers included,",
        "one run at a time (the issue's budget: 5 minutes a run on this 2-core machine)."
        + "".join(f" {job} took {sum(walls) / len(walls):.0f} s a run, over that budget." for job, _, _, walls in rows
                  if sum(walls) / len(walls) > 300),
        "",
        f"<!-- table:{p['table']} -->",
        records.TABLES[p["table"]]().rstrip("\n"),
        f"<!-- /table:{p['table']} -->",
    ]
    lines += experiments.partial(len(rows), planned)
    lines += ["", "Published (same protocol; trained far longer, on other hardware):", "",
              "| method | ring modes | ring high quality (%) | grid modes | grid high quality (%) |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {r[0]} / 8 | {r[1]} | {g[0]} / 25 | {g[1]} |" for name, r, g in PUBLISHED]
    lines += ["", f"Seed {seeds[0]}'s samples (2,500; red circles: 3 std around each mode):", ""]
    suffix = ("" if protocol == "veegan" else f"_{protocol}") + experiments.variant(list(sets))
    lines += [f"![{job}](img/modes_{job}{suffix}.png)" for job, *_ in rows]
    experiments.replace_section(p["section"], "\n".join(lines) + "\n", no_write, after=SECTION)


def main() -> None:
    ap = experiments.parser(__doc__, seeds=None, reuse="the runs (their result.json)", sets=True)
    ap.add_argument("--jobs", default=",".join(JOBS), help="comma list of jobs/<name>.yaml")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="veegan",
                    help="veegan: ring radius 2, 5 sets x 5 seeds; pacgan: PacGAN's ring (radius 1), 1 set x 10 seeds")
    ap.add_argument("--seeds", type=experiments.seed_list, default=None,
                    help="train.seed values (default: the protocol's held-out seeds, 100-104 or 100-109)")
    args = ap.parse_args()
    p = PROTOCOLS[args.protocol]
    args.seeds = args.seeds or experiments.seed_list(p["seeds"])
    if args.protocol == "pacgan" and args.jobs == ",".join(JOBS):  # the grid is the same in both papers
        args.jobs = ",".join(j for j in JOBS if j.endswith("_ring"))
    suffix = "" if args.protocol == "veegan" else f"_{args.protocol}"
    from rayganx.evaluation import metrics
    from rayganx.models import trained
    from rayganx.data.points import mixture_geometry
    from rayganx.store.runs import load_state

    runs = experiments.Runs(record="modes", reuse=args.reuse)
    rows = []
    for job in args.jobs.split(","):
        per_seed, walls, spec = [], [], None
        for seed in args.seeds:
            sets = [f"train.seed={seed}"] + ([f"data.mixture={p['ring']}"] if job.endswith("_ring") else []) + args.sets
            spec = runs.job(f"{job}.yaml", f"{job}{suffix}{experiments.variant(args.sets)}_seed{seed}", sets)

            def score(url):
                g, gspec, _ = trained.generator_from_state(load_state(url))
                return {"scores": metrics.mode_metrics(g, gspec, list(metrics.MODE_METRICS), sets=p["sets"])}

            done = runs.train(spec, score, job=f"jobs/{job}.yaml", sets=sets)
            scores = done["scores"]
            walls.append(done["wall_s"])
            per_seed.append(scores)
            print(f"{job} seed {seed}: modes {scores['modes']:.2f} hq {100 * scores['hq']:.1f}% "
                  f"kl {scores['kl']:.3f} ({walls[-1]:.0f} s)", flush=True)
            if seed == args.seeds[0] and not args.no_write:  # the plots are the section's: --no-write keeps them
                g, gspec, _ = trained.generator_from_state(load_state(done["checkpoint"]))
                centres, std = mixture_geometry(spec.data.mixture)
                pts = metrics.mixture_samples(g, gspec, metrics.MODE_SET_SIZE, seed=0).numpy()
                (ROOT / "docs" / "img").mkdir(exist_ok=True)
                scatter(pts, centres, std, f"{job} (seed {seed}): {scores['modes']:.1f} modes, "
                        f"{100 * scores['hq']:.1f}% hq", ROOT / "docs" / "img" / f"modes_{job}{suffix}{experiments.variant(args.sets)}.png")
        rows.append((job, spec, per_seed, walls))
        # after every row: an interrupted benchmark still leaves the rows it finished
        write_section(rows, args.seeds, len(args.jobs.split(",")), args.no_write, args.protocol, args.sets)


if __name__ == "__main__":
    main()
