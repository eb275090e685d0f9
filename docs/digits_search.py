"""Search digits GAN recipes with rayganx's own GANTask, without Ray (as docs/mode_search.py does
for the 2-D mixtures): quick, single-threaded runs whose FIDs compare with each other.

Builds a JobSpec from a job file plus --set overrides for one worker (`scaling.num_workers=1`, so
the per-worker batch is the job's global batch), feeds the 1,797 digits at the job's image size in
a fresh permutation every epoch, calls `task.schedule` and `task.step` as the training loop (rayganx/training/loop.py) does,
and scores the generator (its EMA copy where the job keeps one) every --eval-every steps: FID of
1,000 samples against all the digits, features from the penultimate layer of a `cnn_digits`
checkpoint (--extractor), as docs/results.py scores the jobs' runs.

    python docs/digits_search.py jobs/sngan_digits.yaml --extractor results_runs/cnn_digits/checkpoint_000400 \
        --seeds 0,1 --set train.optim_d.lr=0.0004 --label ttur --out /tmp/digits.jsonl

One JSON line per seed (label, overrides, seed, fid trace with seconds) goes to --out and a
summary to stdout (docs/experiments.search; seeds 100-104 are held out for reported results). The final numbers of docs/results.md come from the jobs themselves
(docs/results.py: 2 Ray Train workers, Ray Data); this only ranks recipes.
"""

from __future__ import annotations

import statistics
import time

import experiments
SAMPLES = 1000


def real_images(spec):
    import numpy as np
    import torch
    from PIL import Image

    from rayganx.data import sources as rdata

    raw, labels = rdata.digits_arrays()
    imgs = [rdata.to_array(Image.fromarray(r, mode="L"), spec.data.image_size, spec.data.channels, None) for r in raw]
    return rdata.model_input(torch.from_numpy(np.stack(imgs))), torch.from_numpy(labels)


def run_one(job: str, overrides: list[str], seed: int, extractor_url: str, eval_every: int, log=print) -> dict:
    import torch

    from rayganx.evaluation import metrics
    from rayganx.job import spec as jobspec
    from rayganx.evaluation.extractors import features_of, load_extractor
    from rayganx.models.networks import generate
    from rayganx.training.tasks import TASKS

    spec = jobspec.load(job, list(overrides) + ["scaling.num_workers=1", f"train.seed={seed}"])
    assert spec.data.source == "digits" and spec.is_gan, "a digits GAN job is expected"
    ev = spec.eval.model_copy(update={"features": "classifier", "extractor": extractor_url})
    extractor = load_extractor(ev, spec.data.channels)
    x, y = real_images(spec)
    real = features_of(extractor, x)[0]
    num_classes = 10 if spec.model.conditional else None
    t, total, device = spec.train, spec.train.steps, torch.device("cpu")
    torch.manual_seed(t.seed)
    task = TASKS[spec.model.kind](spec, num_classes, device, False)
    torch.manual_seed(t.seed)
    perm_gen = torch.Generator().manual_seed(t.seed)
    bs = spec.per_worker_batch

    def fid() -> float:
        g = task.generator()
        was = g.training
        g.eval()
        gen = torch.Generator().manual_seed(12345)
        z = torch.randn(SAMPLES, spec.model.latent_dim, generator=gen)
        labels = torch.arange(SAMPLES) % 10 if num_classes else None
        with torch.no_grad():
            fake = features_of(extractor, generate(g, z, labels))[0]
        g.train(was)
        return metrics.fid(real, fake)

    step, it, trained, trace = 0, 0, 0.0, []
    t0 = time.perf_counter()
    while step < total:
        perm = torch.randperm(len(x), generator=perm_gen)
        for i in range(0, len(x) - bs + 1, bs):
            idx = perm[i:i + bs]
            task.schedule(step, total)
            stepped, _ = task.step(x[idx], y[idx], it, step, total)
            it += 1
            if not stepped:
                continue
            step += 1
            if step % eval_every == 0 or step == total:
                trained += time.perf_counter() - t0  # training time only: scoring is not in the budget
                f = fid()
                trace.append({"step": step, "seconds": round(trained, 1), "fid": round(f, 2)})
                log(f"    step {step}: FID {f:.2f} ({trained:.0f} s)")
                t0 = time.perf_counter()
            if step >= total:
                break
    return {"fid": trace[-1]["fid"], "seconds": trace[-1]["seconds"], "trace": trace}


def main() -> None:
    def add(ap):
        ap.add_argument("--extractor", required=True,
                        help="a cnn_digits checkpoint (rayganx submit jobs/cnn_digits.yaml)")
        ap.add_argument("--eval-every", type=int, default=300)

    def mean(rows, key):
        return statistics.mean(r[key] for r in rows)

    experiments.search(
        __doc__, lambda args, seed: run_one(args.job, args.overrides, seed, args.extractor, args.eval_every),
        line=lambda r: f"FID {r['fid']:.2f} ({r['seconds']:.0f} s) " + " ".join(
            f"{p['step']}:{p['fid']:.0f}" for p in r["trace"]),
        summary=lambda rows: f"FID {experiments.mean_std([r['fid'] for r in rows], '.2f')}, {mean(rows, 'seconds'):.0f} s",
        add_arguments=add, seeds="0")


if __name__ == "__main__":
    experiments.single_threaded()
    main()
