"""A sweep's results: trials ranked by their best reported metric, and the best trial's job."""

from __future__ import annotations

import math
import os

import yaml

from rayganx.job import spec as jobspec
from rayganx.store.storage import Store
from rayganx.sweeps.sweep import Sweep


def leaderboard(sw: Sweep, grid) -> dict:
    """Trials ranked by their best reported metric (read from each trial's metrics log)."""
    from rayganx.training.failures import root_cause
    from rayganx.store.runs import list_checkpoints, read_metrics

    rows = []
    for result in grid:
        name = os.path.basename(result.path.rstrip("/"))
        run = Store(f"{sw.root}/{name}", sw.base.storage.endpoint_url)
        history = read_metrics(run)
        # What Tune saw: the rows at report steps (the last one included).
        reported = [m for m in history if m["step"] % sw.spec.report_every == 0 or m["step"] == sw.max_steps]
        scored = [m for m in reported if isinstance(m.get(sw.metric), (int, float))]
        best = (min if sw.mode == "min" else max)(scored, key=lambda m: m[sw.metric]) if scored else None
        row = {"trial": name, "config": result.config, "step": history[-1]["step"] if history else 0,
               "best": best[sw.metric] if best else None, "best_step": best["step"] if best else None,
               "run": f"{sw.root}/{name}"}
        if result.error:
            row["status"] = "error: " + root_cause(result.error)
        else:
            row["status"] = "finished" if row["step"] >= sw.max_steps else "stopped early"
        ckpts = list_checkpoints(run)
        pick = [c for c in ckpts if c["step"] == row["best_step"]] or ckpts[-1:]
        row["checkpoint"] = pick[0]["url"] if pick else None
        rows.append(row)
    sign = 1 if sw.mode == "min" else -1
    rows.sort(key=lambda r: (r["best"] is None, sign * r["best"] if r["best"] is not None else 0, r["trial"]))
    return {"sweep": sw.spec.name, "metric": sw.metric, "mode": sw.mode, "root": sw.root, "trials": rows}


def best_job_yaml(sw: Sweep, best: dict) -> str:
    """The best trial's job at the base job's full budget, as a job `rayganx submit` accepts."""
    spec = sw.trial_spec(best["config"], f"{sw.spec.name}-best")
    raw = spec.to_dict()
    raw["storage"]["path"] = sw.base.storage.path
    raw["storage"]["checkpoint_every"] = sw.base.storage.checkpoint_every
    raw["train"]["steps"], raw["train"]["epochs"] = sw.base.train.steps, sw.base.train.epochs
    if raw["eval"]["every"] and raw["storage"]["checkpoint_every"] % raw["eval"]["every"]:
        raw["eval"]["every"] = math.gcd(raw["eval"]["every"], raw["storage"]["checkpoint_every"])
    jobspec.from_dict(raw, "best_job.yaml")  # it must be a valid job
    header = (f"# Best trial of sweep {sw.spec.name}: {best['trial']}, {sw.metric} {best['best']:.6g} at step "
              f"{best['best_step']}.\n# Its checkpoint: {best['checkpoint']}\n"
              f"# Train it at the full budget: rayganx submit best_job.yaml\n")
    return header + yaml.safe_dump(raw, sort_keys=False)
