"""`rayganx bench` of the shipped jobs, recorded: one row per bench in docs/records/perf_bench.jsonl
(the whole JSON that `rayganx bench --json` writes, with the commit and the machine).

    python docs/bench_records.py jobs/dcgan_digits.yaml --workers 1,2 --steps 100 --warmup 20
    python docs/bench_records.py jobs/dcgan_celeba.yaml --steps 30 --warmup 5   # stand-in images

Run on a quiet machine, one at a time; `python docs/records.py --write` makes the tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import records  # noqa: E402


def main() -> None:
    from rayganx.job import spec as jobspec
    from rayganx.training.bench import bench

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job")
    ap.add_argument("--workers", default="1")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    t0 = time.time()
    res = bench(jobspec.load(args.job, args.sets), steps=args.steps, warmup=args.warmup,
                workers=[int(w) for w in args.workers.split(",")])
    records.append("perf_bench", job=args.job, sets=args.sets, seed=0, wall_s=time.time() - t0, metrics=res,
                   argv=sys.argv[1:])
    print(records.TABLES["perf-bench"]())


if __name__ == "__main__":
    main()
