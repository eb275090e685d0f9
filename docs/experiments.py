"""What the measuring scripts under docs/ share: their command line, the loop that trains one run
after another (resumable, each finished run recorded), the mean ± std cells of their tables and
the section of docs/results.md each one owns.

    parser(__doc__)                   # --seeds, --reuse, --no-write, as every script spells them
    Runs(storage, record="digits")    # .job(...) then .train(spec, score): one run, kept and recorded
    replace_section(title, text)      # this script's section of docs/results.md, the others kept
    search(__doc__, run_one, ...)     # the recipe searches' main: seeds, --set, --label, --out

Seeds: searches choose on seeds below HELD_OUT; reported numbers use HELD_OUT (no search may
touch them: `search` refuses them), so a figure is never scored on the seeds it was chosen on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results.md"
STORAGE = os.environ.get("RAYGANX_RESULTS_STORAGE", str(ROOT / "results_runs"))
HELD_OUT = range(100, 105)  # training (and scorer) seeds that only reported results use

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))


def seed_list(text: str) -> list[int]:
    """ "0,1,2" or "100-104" (inclusive), or a mix: "0,5-7"."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def parser(doc: str, *, seeds: str | None = f"{HELD_OUT[0]}-{HELD_OUT[-1]}", reuse: str | None = None,
           write: bool = True, sets: bool = False) -> argparse.ArgumentParser:
    """The options every measuring script takes, spelled alike: --seeds (unless seeds is None),
    --reuse (its help names what is kept), --no-write, and with `sets` a --set applied to every
    run (data held out as well as seeds: --set data.classes=[5,6,7,8,9])."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if sets:
        ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every job this script runs (repeatable; recorded with each run)")
    if seeds is not None:
        ap.add_argument("--seeds", type=seed_list, default=seed_list(seeds),
                        help=f"train.seed values: a comma list or a range (default {seeds})")
    if reuse is not None:
        ap.add_argument("--reuse", action="store_true", help=f"keep {reuse} already made; make the rest")
    if write:
        ap.add_argument("--no-write", action="store_true", help="print the section, leave docs/ alone")
    return ap


def variant(sets: list[str]) -> str:
    """A suffix for run names under extra --sets, so that --reuse never takes one variant's run
    for another's."""
    import hashlib

    return "_" + hashlib.sha256(" ".join(sets).encode()).hexdigest()[:6] if sets else ""


def mean_std(values: list[float], fmt: str = ".1f", scale: float = 1.0) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(scale * statistics.mean(values), fmt)} ± {format(scale * sd, fmt)}"


def partial(done: int, planned: int) -> list[str]:
    """The note under a table that an interrupted script wrote before all its rows were in."""
    return [] if done >= planned else ["", f"(Partial: {done} of {planned} jobs so far; the benchmark was still running.)"]


def produced_by(command: str, detail: str) -> str:
    """The first line of a section: what wrote it, when, on what."""
    return (f"Produced by `{command}` on {datetime.date.today()} ({platform.machine()}, {os.cpu_count()} CPU "
            f"cores; {detail})")


def replace_section(title: str, section: str, no_write: bool = False, after: str | None = None) -> None:
    """Print `section`, then put it in docs/results.md in place of the one headed `title` (up to
    the next `## ` heading), or when there is none, right after the section headed `after` (or at
    the end): the sections other scripts write stay as they are."""
    print(section)
    if no_write:
        return
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if title in text:
        head, rest = text.split(title, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        text = head + section + ("\n" + tail if tail else "")
    elif after and after in text:
        head, rest = text.split(after, 1)
        nxt = rest.find("\n## ")
        text = head + after + (rest[:nxt + 1] + section + "\n" + rest[nxt + 1:] if nxt >= 0
                               else rest.rstrip("\n") + "\n\n" + section)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    RESULTS.write_text(text)
    print(f"wrote the section {title.lstrip('# ')!r} of docs/results.md", flush=True)


class Runs:
    """rayganx runs trained one at a time through this process's Ray. A finished run leaves
    result.json in its folder (written last: a run killed before it is trained again with
    reuse) and, with `record`, one row in docs/records/<record>.jsonl (records.append). Without
    result.json a run folder is trained afresh: a run from before these scripts (their own
    markers), or one cut off, is never taken for a finished one."""

    def __init__(self, storage: str = STORAGE, record: str | None = None, reuse: bool = False):
        self.storage, self.record, self.reuse = storage, record, reuse
        self.local = "://" not in storage  # results kept, folders cleared: on a local run store only
        self._ray = False

    def job(self, base: str, name: str, sets: list[str]):
        from rayganx.job import spec as jobspec

        return jobspec.load(ROOT / "jobs" / base, [f"storage.path={self.storage}", f"name={name}", *sets])

    def finished(self, spec) -> dict | None:
        path = Path(self.storage) / spec.name / "result.json"
        return json.loads(path.read_text()) if self.reuse and self.local and path.exists() else None

    def train(self, spec, score: Callable[[str], dict] | None = None, *, job: str | None = None,
              sets: list[str] = ()) -> dict:
        """{wall_s, checkpoint, steps, metrics (the run's last row), **score(checkpoint)}."""
        from rayganx.training import runner

        if (done := self.finished(spec)) is not None:
            return done
        if not self._ray:
            from rayganx.job import cluster

            cluster.init_ray()
            self._ray = True
        run = Path(self.storage) / spec.name
        if self.local:  # a run of the same name would resume, not train afresh
            shutil.rmtree(run, ignore_errors=True)
        t0 = time.time()
        result = runner.run(spec)
        wall = time.time() - t0
        out = {"wall_s": wall, "checkpoint": result.checkpoints[-1]["url"], "steps": result.steps,
               "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}
        if score:
            out |= score(out["checkpoint"])
        if self.record:
            import records

            # the score's figures, top-level or in a dict of their own ({"scores": {...}})
            numbers = {k: v for k, v in out.items() if isinstance(v, (int, float)) and k != "wall_s"}
            for key, value in out.items():
                if isinstance(value, dict) and key != "metrics":
                    numbers |= {k: v for k, v in value.items() if isinstance(v, (int, float))}
            records.append(self.record, job=job, sets=list(sets), seed=spec.train.seed, wall_s=wall,
                           metrics={**out["metrics"], **numbers}, run=spec.name)
        if self.local:
            (run / "result.json").write_text(json.dumps(out))
        print(spec.name, json.dumps({k: v for k, v in out.items() if k != "metrics"}), flush=True)
        return out


def search(doc: str, run_one: Callable, line: Callable[[dict], str], summary: Callable[[list[dict]], str],
           add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, seeds: str = "0,1") -> None:
    """A recipe search's main: `run_one(args, seed)` per seed of --seeds (never a HELD_OUT one),
    one JSON line per seed to --out (label, job, overrides, seed and the run's figures), a line
    per seed and a summary over them to stdout. Single-threaded by default so timings compare."""
    ap = parser(doc, seeds=seeds, write=False)
    ap.add_argument("job", help="the job file the search starts from")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value (repeatable)")
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", default=None, help="append one JSON line per seed here")
    ap.add_argument("--threads", type=int, default=1)
    if add_arguments:
        add_arguments(ap)
    args = ap.parse_args()
    touched = sorted(set(args.seeds) & set(HELD_OUT))
    if touched:
        ap.error(f"seeds {touched} are held out for reported results; a search may not use them")
    import torch

    torch.set_num_threads(args.threads)
    label = args.label or " ".join(args.overrides) or "as written"
    rows = []
    for seed in args.seeds:
        r = run_one(args, seed)
        r.update(label=label, job=args.job, overrides=args.overrides, seed=seed)
        rows.append(r)
        print(f"{label} seed {seed}: {line(r)}", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(f"SUMMARY {label}: {summary(rows)} over {len(rows)} seeds", flush=True)


def single_threaded() -> None:
    """Before torch loads: one thread per process, so that timings of searches compare."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
