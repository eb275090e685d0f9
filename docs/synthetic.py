"""Synthetic training data on digits: write the "Synthetic training data" section of docs/results.md.

    python docs/synthetic.py                  # k 10 and 50 per class x the held-out seeds 100-104, plus the full-data CAS
    python docs/synthetic.py --reuse          # after an interruption: keep the runs already finished
    python docs/synthetic.py --reuse --stop-after 360   # start no new run after 6 minutes (then rerun)
    python docs/synthetic.py --from-records   # no Ray, no training: the section from the finished runs

Low-data regime: for k labelled digits per class (data.per_class: k, the first k of each class of
the training split) and each seed, three rayganx runs: the conditional GAN of jobs/cgan_digits.yaml
on those k per class, the CNN of jobs/cnn_digits.yaml on them alone, and the same CNN with
data.synthetic (that seed's cGAN, fraction F of the training rows generated). Each CNN's score is
its accuracy on the real held-out split (every image data.val_fraction holds out, which neither
network ever reads). The CAS of each low-data cGAN is computed too.

CAS: the cGAN trained on the whole training split (data.per_class above any class's count, so the
held-out digits stay out of it), scored with `rayganx eval CKPT --metrics cas`: the CNN trained on
generated digits only, as many per class as the training split has, against the same CNN trained
on the real split.

Runs go to results_runs/synthetic/ (RAYGANX_RESULTS_STORAGE overrides); each finished run leaves a
result.json there, which --reuse keeps, and a row of docs/records/synthetic.jsonl.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import experiments
from experiments import ROOT

STORAGE = experiments.STORAGE + "/synthetic"
SECTION = "## Synthetic training data"
# Ravuri & Vinyals 2019, Table 1 (ImageNet 256 px, ResNet-50 top-1 on the real validation set)
PUBLISHED = [("real data", 73.1), ("BigGAN-deep", 42.7), ("VQ-VAE-2", 54.8)]


class OutOfTime(Exception):
    pass


class Bench:
    def __init__(self, args):
        from rayganx.training import runner

        self.args, self.runner, self.t0 = args, runner, time.time()
        self.runs = experiments.Runs(STORAGE, record="synthetic", reuse=args.reuse or args.from_records)

    def job(self, base: str, name: str, sets: list[str]):
        return self.runs.job(base, name, sets)

    def run(self, spec, score=None, base: str = "", sets: list[str] = ()) -> dict:
        """One run (or its record, with --reuse): {wall_s, checkpoint, val_accuracy, ...score}."""
        done = self.runs.finished(spec)
        if done is None:
            if self.args.from_records or (self.args.stop_after and time.time() - self.t0 > self.args.stop_after):
                raise OutOfTime(spec.name)
            done = self.runs.train(spec, score, job=f"jobs/{base}", sets=list(sets))
        for key in ("val_accuracy", "synthetic_share"):
            done.setdefault(key, done.get("metrics", {}).get(key))
        return done

    def cas(self, checkpoint: str) -> dict:
        """What `rayganx eval CHECKPOINT --metrics cas` computes."""
        from rayganx.models import trained
        from rayganx.evaluation import scoring
        from rayganx.store.runs import load_state

        g, spec, classes = trained.generator_from_state(load_state(checkpoint))
        t0 = time.time()
        scores = scoring.evaluate_generator(g, self.runner.resolve_paths(spec), classes, ["cas"], 2)
        return scores | {"cas_s": time.time() - t0}

    def gan(self, k: int | str, seed: int, steps: int, cas: bool = True) -> dict:
        per_class = 1000 if k == "all" else k
        sets = [f"data.per_class={per_class}", f"train.seed={seed}", f"train.steps={steps}", "scaling.num_workers=1",
                "scaling.cpus_per_worker=2", f"storage.checkpoint_every={steps}", "storage.keep=1",
                f"samples.every={steps}"]
        return self.run(self.job("cgan_digits.yaml", f"cgan_k{k}_s{seed}", sets), self.cas if cas else None,
                        "cgan_digits.yaml", sets)

    def cnn(self, k: int, seed: int, generator: str | None) -> dict:
        a = self.args
        sets = [f"data.per_class={k}", f"train.seed={seed}", f"train.steps={a.cnn_steps}", "scaling.num_workers=1",
                "scaling.cpus_per_worker=2", f"storage.checkpoint_every={a.cnn_steps}"]
        if generator:
            sets += [f"data.synthetic.generator={generator}", f"data.synthetic.fraction={a.fraction}"]
        return self.run(self.job("cnn_digits.yaml", f"cnn{'_syn' if generator else ''}_k{k}_s{seed}", sets), None,
                        "cnn_digits.yaml", sets)


def ms(values: list[float]) -> str:
    return experiments.mean_std(values, ".1f", 100.0)


def cas_cell(values: list) -> str:
    """The CAS column: over the seeds whose cGAN was scored (--no-low-cas skips some)."""
    have = [v for v in values if v is not None]
    return ms(have) + (f" (seeds scored: {len(have)})" if len(have) != len(values) else "")


def write_section(args, low: dict, full: dict | None, complete: bool, took: float) -> None:
    cmd = "python docs/synthetic.py" + (" --reuse" if args.reuse else "") + (
        " --from-records" if args.from_records else "")
    lines = [
        SECTION,
        "",
        experiments.produced_by(cmd, "shared with other work; one Ray Train worker of 2 CPUs per run") + ". Every number is a rayganx run's; the script "
        f"trains them all ({'this section was written from the finished runs; ' if args.from_records else ''}"
        f"wall time of this invocation: {took / 60:.0f} min; the runs' own times are below).",
        "",
        "**Classification Accuracy Score** (Ravuri & Vinyals 2019): the CNN of `jobs/cnn_digits.yaml` "
        "(width 32, Adam 1e-3, batch 64, 400 steps) trained on generated digits only, as many per class as "
        "the real training split holds, tested on the real held-out split; the reference row is the same "
        "CNN trained on the real training split. `rayganx eval CKPT --metrics cas`.",
        "",
        "| classifier trained on | held-out accuracy (%) | published anchor, ImageNet 256 px, top-1 (%) |",
        "| --- | --- | --- |",
    ]
    if full:
        lines += [f"| real training split ({full['n_train']} digits) | {100 * full['cas_real']:.1f} | "
                  f"real data {PUBLISHED[0][1]} |",
                  f"| cGAN samples (`jobs/cgan_digits.yaml`, {full['steps']} steps on the training split) | "
                  f"{100 * full['cas']:.1f} | BigGAN-deep {PUBLISHED[1][1]}, VQ-VAE-2 {PUBLISHED[2][1]} |",
                  "", f"(The cGAN: `data.per_class: 1000`, above every class's count, so all {full['n_train']} "
                  f"training digits and none of the held-out ones; its run took {full['wall_s']:.0f} s, the CAS "
                  f"{full['cas_s']:.0f} s.)"]
    else:
        lines += ["| (not measured yet) | | |"]
    lines += [
        "",
        f"**Low-data regime**: k real digits per class (`data.per_class: k`, the first k of each class of the "
        f"training split); the cGAN of `jobs/cgan_digits.yaml` trained on the same k per class for "
        f"{args.gan_steps} steps{' (the job default)' if args.gan_steps == 1200 else ' (the job default is 1200)'}; the "
        f"CNN of `jobs/cnn_digits.yaml` ({args.cnn_steps} steps) on the k per class alone, and with "
        f"`data.synthetic: {{generator: <that seed's cGAN>, fraction: {args.fraction}}}` (as many generated rows "
        f"as real ones). Accuracy on the real held-out split (all of it), mean ± std over the seeds (planned: "
        f"{', '.join(map(str, args.seeds))}; each seed its own cGAN and CNNs); CAS of that cGAN beside it (its `cas_real` is the "
        f"real-only column's recipe run in-process).",
        "",
        "| real per class | seeds | CNN, real only (%) | CNN, real + synthetic (%) | difference (points) "
        "| CAS of the cGAN (%) | wall time per seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, rows in low.items():
        real = [r["real"]["val_accuracy"] for r in rows]
        mix = [r["syn"]["val_accuracy"] for r in rows]
        diff = [b - a for a, b in zip(real, mix)]
        wall = statistics.mean(r["gan"]["wall_s"] + r["real"]["wall_s"] + r["syn"]["wall_s"] for r in rows)
        lines.append(f"| {k} | {len(rows)} | {ms(real)} | {ms(mix)} | {ms(diff)} | {cas_cell([r['gan'].get('cas') for r in rows])} | "
                     f"{wall:.0f} s |")
    if not complete:
        lines += ["", "(Partial: the measurement was still running; rerun `python docs/synthetic.py --reuse`.)"]
    lines += ["", "Per seed (held-out accuracy %, real only / real + synthetic):", ""]
    for k, rows in low.items():
        lines.append(f"- k={k}: " + ", ".join(f"seed {seed}: {100 * r['real']['val_accuracy']:.1f} / "
                                              f"{100 * r['syn']['val_accuracy']:.1f}" for seed, r in zip(args.seeds, rows)))
    lines += ["", verdict(low)]
    experiments.replace_section(SECTION, "\n".join(lines) + "\n", args.no_write)


def verdict(low: dict) -> str:
    """Whether the synthetic rows helped, read off the table by a fixed rule: a mean difference
    larger than its standard deviation over seeds counts as an effect, anything else as none."""
    said = []
    for k, rows in low.items():
        diff = [r["syn"]["val_accuracy"] - r["real"]["val_accuracy"] for r in rows]
        d = 100 * statistics.mean(diff)
        if len(diff) < 2:
            said.append(f"at k={k} one seed only ({d:+.1f} points), no spread to judge it by")
            continue
        s = 100 * statistics.stdev(diff)
        what = ("helped" if d > 0 else "hurt") if abs(d) > s else "made no difference beyond the seed-to-seed spread"
        said.append(f"at k={k} the synthetic rows {what} ({d:+.1f} ± {s:.1f} points over {len(diff)} seeds)")
    if not said:
        return ""
    cas = [r["gan"]["cas"] for rows in low.values() for r in rows if r["gan"].get("cas") is not None]
    if cas and statistics.mean(cas) < 0.2:  # 10 classes: chance is 10%
        said.append(f"the low-data cGANs' CAS ({100 * statistics.mean(cas):.1f}%) is near chance (10%): at these "
                    f"steps their samples carry little class information, so their rows act as label noise; "
                    f"this measures short cGAN runs, not what a well-trained generator would add")
    return ("Does it help? By the rule \"a mean difference larger than its std over seeds\": "
            + "; ".join(said) + ".")


def main() -> None:
    ap = experiments.parser(__doc__, reuse="the runs (their result.json)")
    ap.add_argument("--ks", default="10,50", help="real images per class, comma list")
    ap.add_argument("--fraction", type=float, default=0.5, help="data.synthetic.fraction")
    # 300 steps left the k=10 cGANs at chance (CAS 8.6%) and their rows cost the CNN 16 points
    ap.add_argument("--gan-steps", type=int, default=1200, help="low-data cGAN steps (the job's default)")
    ap.add_argument("--full-gan-steps", type=int, default=600, help="full-data cGAN steps for the CAS row")
    ap.add_argument("--cnn-steps", type=int, default=400, help="CNN steps (jobs/cnn_digits.yaml's)")
    ap.add_argument("--stop-after", type=float, default=0, help="start no new run after this many seconds")
    ap.add_argument("--no-low-cas", action="store_true",
                    help="skip the CAS of the low-data cGANs trained from now on (it costs about half a cGAN run)")
    ap.add_argument("--from-records", action="store_true",
                    help="train nothing, start no Ray: write the section from the finished runs' result.json")
    args = ap.parse_args()
    t0 = time.time()
    bench = Bench(args)
    Path(STORAGE).mkdir(parents=True, exist_ok=True)
    low, full, complete = {}, None, False
    ks = [int(v) for v in args.ks.split(",")]
    try:
        # the smallest k first, then the CAS row, then the other ks: an interrupted measurement
        # (see --stop-after) still has both kinds of result
        for i, k in enumerate(ks):
            for seed in args.seeds:
                gan = bench.gan(k, seed, args.gan_steps, cas=not args.no_low_cas)
                real = bench.cnn(k, seed, None)
                syn = bench.cnn(k, seed, gan["checkpoint"])
                low.setdefault(k, []).append({"gan": gan, "real": real, "syn": syn})
            if i == 0:
                full = bench.gan("all", args.seeds[0], args.full_gan_steps)
                from rayganx.data import sources as rdata
                from rayganx.job import spec as jobspec

                d = jobspec.load(ROOT / "jobs" / "cnn_digits.yaml").data
                full["n_train"] = rdata.count_rows(d, "train")
        complete = True
    except OutOfTime as e:
        print(f"out of time before {e}; rerun with --reuse", flush=True)
    if not low and not full:  # nothing finished: the committed section is kept as it is
        raise SystemExit(f"no finished run under {STORAGE} for seeds {args.seeds}; nothing written")
    write_section(args, low, full, complete, time.time() - t0)


if __name__ == "__main__":
    main()
