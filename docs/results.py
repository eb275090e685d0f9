"""Regenerate docs/results.md: every jobs/*_digits.yaml job's default run, then its final
checkpoint scored with the digits classifier (jobs/cnn_digits.yaml) as the feature extractor.

    python docs/results.py            # about 15 minutes on 2 CPU cores; runs go to results_runs/

Nothing is downloaded: digits ship with scikit-learn and the extractor is trained first.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORAGE = os.environ.get("RAYGANX_RESULTS_STORAGE", str(ROOT / "results_runs"))
SAMPLES = 1000
MODES_SECTION = "## 2-D mixtures: mode coverage"


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from rayganx import cluster, models, runner, spec as jobspec
    from rayganx.metrics import evaluate_generator
    from rayganx.runs import load_state

    cluster.init_ray()
    overrides = [f"storage.path={STORAGE}"]
    t0 = time.time()
    cnn = runner.run(jobspec.load(ROOT / "jobs" / "cnn_digits.yaml", overrides))
    extractor = cnn.checkpoints[-1]["url"]
    rows = [("cnn_digits", "cnn", cnn.steps, f"val accuracy {cnn.metrics['val_accuracy']:.4f}", {},
             time.time() - t0)]
    for job in sorted((ROOT / "jobs").glob("*_digits.yaml")):
        if job.stem == "cnn_digits" or job.stem.startswith(("tune_", "pbt_")):
            continue
        t0 = time.time()
        spec = jobspec.load(job, overrides)
        result = runner.run(spec)
        g, trained, num_classes = models.generator_from_state(load_state(result.checkpoints[-1]["url"]))
        ev = trained.eval.model_copy(update={"features": "classifier", "extractor": extractor})
        trained = trained.model_copy(update={"eval": ev, "storage": spec.storage})
        scores = evaluate_generator(g, runner.resolve_paths(trained), num_classes, ["fid", "kid", "is", "pr"], SAMPLES)
        loss = spec.train.loss if spec.is_gan else "elbo"
        rows.append((job.stem, spec.model.kind, result.steps, loss, scores, time.time() - t0))
        print(job.stem, json.dumps(scores), flush=True)

    lines = [
        "# Results on digits",
        "",
        f"Produced by `python docs/results.py` on {datetime.date.today()} ({platform.machine()}, "
        f"{os.cpu_count()} CPU cores, 2 Ray Train workers each). Every `jobs/*_digits.yaml` job's default run;",
        f"metrics of its final checkpoint (EMA generator where the job keeps one) on {SAMPLES} samples",
        "against the digits, with the penultimate layer of the `jobs/cnn_digits.yaml` classifier as",
        "the feature extractor (and its logits for the Inception Score, at most 10 here). These numbers",
        "are comparable with each other, not with Inception-based FIDs published for other datasets.",
        "Wall times include Ray start-up and evaluation, and vary with what else runs on the machine.",
        "",
        "| job | model | steps | loss | FID | KID | IS | precision | recall | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, kind, steps, loss, s, secs in rows:
        if not s:
            lines.append(f"| {name} | {kind} | {steps} | {loss} | | | | | | {secs:.0f} s |")
            continue
        lines.append(f"| {name} | {kind} | {steps} | {loss} | {s['fid']:.2f} | {s['kid']:.4f} | {s['is']:.2f} | "
                     f"{s['precision']:.3f} | {s['recall']:.3f} | {secs:.0f} s |")
    out = ROOT / "docs" / "results.md"
    # docs/modes.py writes the 2-D section at the end of the file: it stays as it was.
    old = out.read_text() if out.exists() else ""
    kept = old[old.index(MODES_SECTION):] if MODES_SECTION in old else ""
    out.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    print("wrote docs/results.md")


if __name__ == "__main__":
    main()
