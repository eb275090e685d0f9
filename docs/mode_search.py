"""Search 2-D mode-collapse recipes with rayganx's own GANTask, without Ray.

Builds a JobSpec from a job file plus --set overrides, builds the task on the CPU for one
worker (no DDP wrap: `distributed=False`, as the training loop passes for world size 1), feeds it the
batches a 1-worker run reads (rayganx.data.points: a fresh permutation every epoch), calls `task.schedule` and
`task.step` as the training loop does, and scores the generator (its EMA copy where the job keeps
one) with the mode-collapse protocol of rayganx.evaluation.metrics: 5 sets of 2,500 samples.

    python docs/mode_search.py jobs/pacgan_ring.yaml --seeds 0,1 \
        --set train.ema_decay=0.999 --label ema999 --out /tmp/search.jsonl

One JSON line per seed (label, overrides, seed, modes, hq, kl, seconds) goes to --out, and a
mean ± std summary to stdout. Single-threaded by default (--threads) so that timings compare.
"""

from __future__ import annotations

import time

import experiments


def run_one(job: str, overrides: list[str], seed: int, eval_every: int | None = None, log=print) -> dict:
    import torch

    from rayganx.data import sources as rdata
    from rayganx.evaluation import metrics
    from rayganx.models import randomness
    from rayganx.data import rows
    from rayganx.job import spec as jobspec
    from rayganx.training.tasks import TASKS

    spec = jobspec.load(job, list(overrides) + [f"train.seed={seed}"])
    assert spec.data.source == "gaussian_mixture" and spec.is_gan, "a 2-D GAN job is expected"
    t = spec.train
    total = t.steps
    device = torch.device("cpu")
    num_classes = rdata.num_classes(spec.data) if spec.model.conditional else None
    torch.manual_seed(t.seed)  # the initial weights, as Worker.__init__
    task = TASKS[spec.model.kind](spec, num_classes, device, False)

    d = spec.data
    # The batches and draws of a 1-worker Ray Train run of the job (rayganx.data.rows), here without Ray.
    feed = rows.Reader(rows.Points(d.mixture, d.num_points, t.seed), t.batch_size, t.seed).batches()
    names = list(metrics.MODE_METRICS)

    def score() -> dict:
        g = task.generator()
        was = g.training
        s = metrics.mode_metrics(g.eval(), spec, names, metrics.MODE_SET_SIZE, metrics.MODE_SETS, device=device)
        g.train(was)
        return s

    step, t0, trace = 0, time.time(), []
    while step < total:
        task.schedule(step, total)
        pos, batch = next(feed)
        draws = randomness.Draws(t.seed, pos.batches)
        stepped, _ = task.step(batch["image"], batch["label"], pos.batches, step, total, draws)
        if not stepped:
            continue
        step += 1
        if eval_every and step % eval_every == 0 and step < total:
            s = score()
            trace.append({"step": step, **s})
            log(f"    step {step}: modes {s['modes']:.2f} hq {100 * s['hq']:.1f}% ({time.time() - t0:.0f} s)")
    seconds = time.time() - t0
    return {**score(), **spread(task.generator(), spec), "seconds": seconds, "ms_per_step": 1000 * seconds / total,
            "trace": trace}


def spread(g, spec) -> dict:
    """Diagnosis of what costs high quality: the share of samples far off every mode (> 10 std:
    bridges between modes) and the RMS distance to the nearest centre of the others, in std."""
    import torch

    from rayganx.evaluation import metrics
    from rayganx.data.points import mixture_geometry

    centres, std = mixture_geometry(spec.data.mixture)
    was = g.training
    pts = metrics.mixture_samples(g.eval(), spec, 12500, seed=7)
    g.train(was)
    d = torch.cdist(pts.double(), torch.from_numpy(centres)).min(1).values / std
    near = d[d <= 10]
    return {"far": float((d > 10).double().mean()), "rms_std": float(near.pow(2).mean().sqrt()) if len(near) else 0.0}


def main() -> None:
    def add(ap):
        ap.add_argument("--eval-every", type=int, default=None, help="also score every N steps (diagnosis)")

    def ms(rows, key, scale=1.0, fmt=".2f"):
        return experiments.mean_std([r[key] for r in rows], fmt, scale)

    experiments.search(
        __doc__, lambda args, seed: run_one(args.job, args.overrides, seed, args.eval_every),
        line=lambda r: (f"modes {r['modes']:.2f} hq {100 * r['hq']:.2f}% kl {r['kl']:.3f} far {100 * r['far']:.2f}% "
                        f"rms {r['rms_std']:.2f} std ({r['seconds']:.0f} s, {r['ms_per_step']:.1f} ms/step)"),
        summary=lambda rows: (f"modes {ms(rows, 'modes')}, hq {ms(rows, 'hq', 100)}%, "
                              f"{ms(rows, 'seconds', fmt='.0f')} s"),
        add_arguments=add)


if __name__ == "__main__":
    experiments.single_threaded()
    main()
