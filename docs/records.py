"""Per-run records behind every figure in the docs, and the tables made from them.

A script that measures something appends one JSON line per run to docs/records/NAME.jsonl with
`append`: the commit it ran on, the job and its `--set`s, the seed, the machine, the wall time and
every metric. Tables in the docs are never typed: each sits between

    <!-- table:NAME -->
    ...
    <!-- /table:NAME -->

in a Markdown file and is made from the records by a function registered here with `@table`.

    python docs/records.py --write    # regenerate every table in docs/ and README.md
    python docs/records.py --check    # exit 1 naming each table that differs (tests/test_records.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "records"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TABLES: dict[str, Callable[[], str]] = {}
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def commit() -> str:
    """HEAD, with +dirty when the package or the jobs differ from it (the record would not be
    reproducible from the commit alone)."""
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "rayganx", "jobs"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0.0
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray_version}


def append(name: str, *, job: str | None, sets: list[str], seed: int | None, wall_s: float,
           metrics: dict, **extra) -> dict:
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit(), "job": job,
           "sets": list(sets), "seed": seed, "machine": machine(), "wall_s": round(wall_s, 2),
           "metrics": metrics, **extra}
    RECORDS.mkdir(parents=True, exist_ok=True)
    with open(RECORDS / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    return row


def load(name: str) -> list[dict]:
    path = RECORDS / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def table(name: str):
    def register(fn: Callable[[], str]):
        TABLES[name] = fn
        return fn
    return register


def describe_machine(m: dict) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB{gpu}; Python {m['python']}, "
            f"torch {m['torch']}, Ray {m['ray']}")


def provenance(name: str, rows: list[dict]) -> str:
    """The line above a table: its records file, the commits its rows ran on, the machine."""
    commits = sorted({r["commit"] for r in rows})
    return (f"From docs/records/{name}.jsonl (commit{'s' if len(commits) > 1 else ''} "
            f"{', '.join(f'`{c}`' for c in commits)}; {describe_machine(rows[0]['machine'])}).")


def mean_std(values: list[float], fmt: str = "{:.1f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


# ---------------------------------------------------------------------------------------------
# The tables. Each reads its records and returns Markdown; a table with no records says so.

@table("perf-celeba")
def perf_celeba() -> str:
    """docs/celeba_bench.py: the CelebA path on the moto S3 server (prepare, input, eval)."""
    rows = load("perf_celeba")
    if not rows:
        return "_No records yet: python docs/celeba_bench.py_\n"
    last = rows[-1]["run"]
    runs = [r for r in rows if r["run"] == last]
    by = {r["kind"]: r for r in runs}
    head = runs[0]
    out = [f"Recorded {head['time'][:10]} at commit `{head['commit']}` on {describe_machine(head['machine'])}; "
           f"{head['metrics'].get('images', '?'):,} CelebA-shaped 178x218 JPEGs made by the script, all on "
           f"moto's S3 server on loopback (records: docs/records/perf_celeba.jsonl, run `{last}`).", ""]
    if "prepare" in by:
        p = by["prepare"]["metrics"]
        out += ["| step | images/s | wall (s) |", "| --- | ---: | ---: |",
                f"| `rayganx data prepare` zip on S3 -> Parquet shards on S3 (crop 108, 64 px) | "
                f"{p['images_per_s']:.0f} | {p['wall_s']:.1f} |", ""]
    inputs = [r for r in runs if r["kind"] == "input"]
    if inputs:
        out += ["| input (1 Train worker, no model) | input images/s | one 64 px DCGAN worker consumes (img/s) | "
                "input / need | first step (s) |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in inputs:
            m = r["metrics"]
            out.append(f"| {r['source']} | {m['input_images_per_s']:.0f} | {m['worker_images_per_s']:.1f} | "
                       f"{m['input_multiple']:.1f}x | {m['first_step_s']:.1f} |")
        out.append("")
    evals = [r for r in runs if r["kind"] == "eval"]
    if evals:
        out += ["| `rayganx eval` (FID+KID) | samples | samples/s | wall (s) | FID |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in evals:
            m = r["metrics"]
            out.append(f"| {r['workers']} worker{'s' if r['workers'] > 1 else ''} | {m['samples']:,} | "
                       f"{m['samples_per_s']:.0f} | {m['wall_s']:.1f} | {m['fid']:.4f} |")
        out.append("")
    return "\n".join(out)


@table("perf-bench")
def perf_bench() -> str:
    """docs/bench_records.py: the newest `rayganx bench` of each job."""
    rows = load("perf_bench")
    if not rows:
        return "_No records yet: python docs/bench_records.py JOB_\n"
    newest = {}
    for r in rows:
        newest[(r["job"], tuple(r["sets"]))] = r
    out = []
    for (job, sets), r in newest.items():
        m = r["metrics"]
        title = f"`rayganx bench {job}{''.join(' --set ' + s for s in sets)} {' '.join(r['argv'][1:])}`".replace("  ", " ")
        stand_in = " on stand-in images the bench made" if m["stand_in_data"] else ""
        out += [f"{title}{stand_in}: recorded {r['time'][:10]} at `{r['commit']}` on {describe_machine(r['machine'])}.",
                "", "| row | images/s | step ms, median (min-max) | vs plain | first step (s, + over a bare TorchTrainer) "
                "| peak RSS/worker (MB) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        p = m["plain"]
        st = p["step_time"]
        out.append(f"| plain PyTorch | {p['images_per_s']:.0f} | {st['median'] * 1e3:.1f} ({st['min'] * 1e3:.1f}-"
                   f"{st['max'] * 1e3:.1f}) | 1.00 | - | - |")
        for w in m["rayganx"]:
            st = w["step_time"]
            out.append(f"| rayganx, {w['workers']} worker{'s' if w['workers'] > 1 else ''} | {w['images_per_s']:.0f} | "
                       f"{st['median'] * 1e3:.1f} ({st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f}) | "
                       f"**{w['ratio_to_plain']:.2f}** | {w['time_to_first_step']:.1f} "
                       f"({w['startup_over_bare_s']:+.1f}) | {w['peak_rss_mb_per_worker']:.0f} |")
        i = m["input_only"]
        out += [f"| input only (1 worker, no model) | {i['images_per_s']:.0f} | - | "
                f"{i['multiple_of_consumption']:.1f}x what 1 worker consumes | - | - |", ""]
    return "\n".join(out)


@table("digits")
def digits() -> str:
    """docs/results.py: each digits job's final checkpoint scored with the digits classifier's
    features, the newest record of each (job, --set, seed), mean ± std over seeds."""
    rows = load("digits")
    if not rows:
        return "_No records yet: python docs/results.py_\n"
    newest: dict = {}
    for r in rows:
        extra = tuple(s for s in r["sets"] if not s.startswith("train.seed="))
        newest[(r["job"], extra, r["seed"])] = r
    groups: dict = {}
    for (job, extra, seed), r in sorted(newest.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        groups.setdefault((job, extra), []).append(r)
    dcgan = "jobs/dcgan_digits.yaml"

    def split(extra: tuple) -> tuple[tuple, tuple]:
        """(the data a row was scored on, the settings it changed from its job)."""
        return tuple(x for x in extra if x.startswith("data.")), tuple(x for x in extra if not x.startswith("data."))

    fids = {(job, *split(extra)): [r["metrics"].get("fid") for r in rs] for (job, extra), rs in groups.items()}
    # A baseline given the recipes' tuning budget (docs/results.py --tuned): DCGAN at the settings its
    # newest sweep chose, on the same data. The shipped recipes are their own sweeps' choices, and a
    # recipe a sweep re-tuned is that sweep's: either meets the tuned baseline tuned vs tuned.
    swept = {(r["job"], tuple(r["sets"])): r.get("sweep_file", f"jobs/{r['sweep']}.yaml") for r in load("sweeps")}

    def tuned(data: tuple) -> list[float] | None:
        return next((fids[(dcgan, data, sets)] for (job, sets) in reversed(list(swept))
                     if job == dcgan and (dcgan, data, sets) in fids), None)

    def unconditional_gan(job: str, extra: tuple) -> bool:
        """Only these are set against DCGAN: a conditional GAN learns from the labels too, and a VAE
        is another kind of model at another budget."""
        from rayganx.job import spec as jobspec

        spec = jobspec.load(ROOT / job, list(extra))
        return spec.is_gan and not spec.model.conditional

    def versus(fid: list[float], ref: list[float] | None) -> str:
        if not ref:
            return ""
        return (f"{100 * (statistics.mean(fid) / statistics.mean(ref) - 1):+.0f}%, lower in "
                f"{sum(f < statistics.mean(ref) for f in fid)} of {len(fid)} seeds")

    out = [provenance("digits", [r for rs in groups.values() for r in rs]), "",
           "| job | --set | seeds | FID | KID | IS | precision | recall | FID vs DCGAN | vs tuned DCGAN | FID per seed "
           "| wall time |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (job, extra), rs in groups.items():
        m = [r["metrics"] for r in rs]
        seeds = ", ".join(str(r["seed"]) for r in rs)
        wall = statistics.mean(r["wall_s"] for r in rs)
        data, recipe = split(extra)
        sets = " ".join(f"`{s}`" for s in extra) + (f" (the best of `{swept[(job, recipe)]}`)"
                                                     if (job, recipe) in swept else "")
        if "fid" not in m[0]:  # the classifier the others are scored with
            out.append(f"| {job} | {sets} | {seeds} | val accuracy {mean_std([x['val_accuracy'] for x in m], '{:.4f}')} "
                       f"| | | | | | | | {wall:.0f} s |")
            continue
        fid = [x["fid"] for x in m]
        against = job != dcgan and unconditional_gan(job, extra)
        rel = versus(fid, fids.get((dcgan, data, ()))) if against and not recipe else ""
        rel_tuned = versus(fid, tuned(data)) if against and (not recipe or (job, recipe) in swept) else ""
        out.append(f"| {job} | {sets} | {seeds} | {mean_std(fid)} | {mean_std([x['kid'] for x in m])} | "
                   f"{mean_std([x['is'] for x in m], '{:.2f}')} | {mean_std([x['precision'] for x in m], '{:.3f}')} | "
                   f"{mean_std([x['recall'] for x in m], '{:.3f}')} | {rel} | {rel_tuned} | "
                   f"{', '.join(f'{f:.1f}' for f in fid)} | {wall:.0f} s |")
    return "\n".join(out) + "\n"


def _modes(protocol: str) -> str:
    """docs/modes.py: each 2-D job's final generator scored by the VEEGAN / PacGAN protocol, the
    newest record of each (job, --set, seed), mean ± std over seeds, in the order they ran."""
    import modes
    from rayganx.data.points import mixture_geometry
    from rayganx.job import spec as jobspec

    ring = modes.PROTOCOLS[protocol]["ring"]
    newest: dict = {}
    for r in load("modes"):
        mixture = next((s.split("=", 1)[1] for s in r["sets"] if s.startswith("data.mixture=")), None)
        if r["job"].endswith("_ring.yaml") and mixture != ring or r["job"].endswith("_grid.yaml") and protocol != "veegan":
            continue  # the grid is the same in both papers: its rows are the VEEGAN table's
        extra = tuple(s for s in r["sets"] if not s.startswith(("train.seed=", "data.mixture=")))
        newest[(r["job"], extra, r["seed"])] = r
    if not newest:
        return f"_No records yet: python docs/modes.py --protocol {protocol}_\n"
    groups: dict = {}
    for (job, extra, _), r in newest.items():
        groups.setdefault((job, extra), []).append(r)
    out = [provenance("modes", [r for rs in groups.values() for r in rs]), "",
           "| job | --set | mixture | recipe | steps | seeds | modes | high quality (%) | width | KL "
           "| modes / high quality per seed | wall time |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (job, extra), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        spec = jobspec.load(ROOT / job, [f"data.mixture={ring}"] * job.endswith("_ring.yaml") + list(extra))
        k = len(mixture_geometry(spec.data.mixture)[0])
        m = [r["metrics"] for r in rs]
        per_seed = ", ".join(f"{x['modes']:g} / {100 * x['hq']:.1f}" for x in m)
        out.append(f"| {Path(job).stem} | {' '.join(f'`{s}`' for s in extra)} | {spec.data.mixture} | "
                   f"{modes.describe(spec)} | {spec.train.steps} | {', '.join(str(r['seed']) for r in rs)} | "
                   f"{mean_std([x['modes'] for x in m], '{:.2f}')} / {k} | {mean_std([100 * x['hq'] for x in m])} | "
                   f"{mean_std([x['width'] for x in m], '{:.2f}')} | {mean_std([x['kl'] for x in m], '{:.3f}')} | "
                   f"{per_seed} | "
                   f"{statistics.mean(r['wall_s'] for r in rs):.0f} s |")
    return "\n".join(out) + "\n"


@table("modes")
def modes_veegan() -> str:
    return _modes("veegan")


@table("modes-pacgan")
def modes_pacgan() -> str:
    return _modes("pacgan")


def render() -> dict[Path, str]:
    """Every doc with its tables regenerated (only those that change)."""
    changed = {}
    for path in DOCS:
        text = path.read_text()

        def fill(m):
            name = m.group("name")
            if name not in TABLES:
                raise SystemExit(f"{path.relative_to(ROOT)}: no table named {name} in docs/records.py")
            return m.group(1) + TABLES[name]().rstrip("\n") + "\n" + m.group(4)

        new = BLOCK.sub(fill, text)
        if new != text:
            changed[path] = new
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    changed = render()
    if args.write:
        for path, text in changed.items():
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    elif changed:
        for path in changed:
            print(f"{path.relative_to(ROOT)}: a table differs from its records (python docs/records.py --write)")
        sys.exit(1)


if __name__ == "__main__":
    main()
