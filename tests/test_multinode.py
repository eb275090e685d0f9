"""A real multi-node Ray cluster on this machine: a head and three worker nodes, each its own
`ray start` (own ports and temp dir), runs stored on the moto S3 server. The driver runs as a
subprocess (`rayganx run` with RAY_ADDRESS), as the Jobs API runs it on a head.

An elastic run (`scaling.num_workers: [1, 3]`, one worker per node) loses a node mid-run and goes
on with the two that remain, then grows back to three when a node returns; the ids of the rows
every worker read (the RAYGANX_FAULT_TRACE_IDS hook) show every epoch read exactly once, in the
order the seed fixes, whatever the number of workers."""

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from rayganx.data import order
from tests.cluster import Cluster
from tests.conftest import JOBS, ROOT

pytestmark = pytest.mark.slow
BUCKET = "s3://rayganx-test/multinode"
BATCH = 48  # splits evenly over 1, 2 and 3 workers


@pytest.fixture(scope="module")
def cluster():
    # Node loss is noticed through GCS health checks: 1 s x 3 misses instead of 3 s x 5. A restart first
    # asks for the workers it had (the lost node may still count) and shrinks only once that start times
    # out: 20 s instead of Ray Train's 60.
    c = Cluster(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                RAY_health_check_initial_delay_ms="1000", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
                RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20")
    try:
        c.start_head(num_cpus=0, object_store=150_000_000)  # no CPUs on the head, as on KubeRay
        c.workers = [c.add_node() for _ in range(3)]  # 2 CPUs each, a Train worker's
        yield c
    finally:
        c.stop()


def job_file(tmp_path, s3_server: str, steps: int) -> Path:
    raw = yaml.safe_load((JOBS / "dcgan_digits.yaml").read_text())
    raw.update(name="elastic", samples={"every": 100000, "n": 4})
    raw["model"] |= {"ngf": 8, "ndf": 8}
    raw["train"] |= {"steps": steps, "batch_size": BATCH, "log_every": 5}
    # A worker fills its node, as a GPU worker does its pod: Ray's elastic policy counts free CPUs, not
    # nodes, and with one CPU each would try three workers on the two nodes left after a loss.
    raw["scaling"] |= {"num_workers": [1, 3], "placement_strategy": "STRICT_SPREAD", "max_failures": 3,
                       "cpus_per_worker": 2,
                       "resize_check_s": 5}
    raw["storage"] = {"path": BUCKET, "endpoint_url": s3_server, "checkpoint_every": 10, "keep": 3}
    path = tmp_path / "elastic.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def rows(s3_server: str) -> list[dict]:
    from rayganx.store.runs import read_metrics
    from rayganx.store.storage import Store

    return [r for r in read_metrics(Store(f"{BUCKET}/elastic", s3_server)) if "event" not in r]


def wait_for(what, predicate, timeout: float, proc, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {log.read_text()[-3000:]}")
        got = predicate()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout} s; the driver printed: {log.read_text()[-3000:]}")


def counted_batches(trace_dir: Path) -> dict[int, list[dict]]:
    """Per global batch index, the rows of the attempt whose update counted: the last to read it
    (an attempt that died after reading a batch was rolled back to its checkpoint, and the next
    attempt read that batch again some seconds later)."""
    by_index = defaultdict(list)
    for f in trace_dir.glob("ids_*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            by_index[row["batches"]].append(row)
    return {k: [r for r in rs if r["time"] > max(x["time"] for x in rs) - 3] for k, rs in by_index.items()}


def test_an_elastic_run_loses_a_node_goes_on_with_two_grows_back_and_reads_every_epoch_once(cluster, s3_server,
                                                                                             tmp_path):
    trace = tmp_path / "trace"
    trace.mkdir()
    steps = 200
    env = {**os.environ, **cluster.driver_env(), "PYTHONPATH": str(ROOT), "RAYGANX_FAULT_TRACE_IDS": str(trace)}
    log = tmp_path / "driver.log"
    proc = subprocess.Popen([sys.executable, "-m", "rayganx.cli", "run", str(job_file(tmp_path, s3_server, steps))],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    t0 = time.monotonic()
    try:
        def on_three_past_two_checkpoints():
            rs = rows(s3_server)
            return rs if rs and rs[-1]["step"] > 20 and any(r.get("workers") == 3 for r in rs) else None

        wait_for("three workers past two checkpoints", on_three_past_two_checkpoints, 240, proc, log)
        placed = next(r for r in rows(s3_server) if r.get("workers") == 3)["node_ids"]
        assert len(set(placed)) == 3 and set(placed) <= set(cluster.workers), placed
        victim = placed[1]
        killed_step = rows(s3_server)[-1]["step"]
        cluster.kill_node(victim)
        killed_at = time.monotonic()
        # No node comes back for now: the run goes on with the two that remain.
        two = wait_for("a restart on two workers", lambda: [r for r in rows(s3_server) if r.get("workers") == 2],
                       180, proc, log)[0]
        assert victim not in two["node_ids"]
        on_two_after = time.monotonic() - killed_at
        # A node returns: the run grows back to three.
        cluster.workers.append(cluster.add_node())
        wait_for("growing back to three workers",
                 lambda: [r for r in rows(s3_server) if r.get("workers") == 3 and r["step"] > two["step"]], 180, proc, log)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    history = rows(s3_server)
    assert history[-1]["step"] == steps
    assert [r.get("workers") for r in history if "workers" in r] == [3, 2, 3], [(r["step"], r.get("workers"))
                                                                                  for r in history if "workers" in r]

    # Every global batch that counted holds BATCH distinct rows over however many workers read it, and
    # each epoch's batches are exactly its permutation, in order: no row skipped, none read twice.
    counted = counted_batches(trace)
    n, seed = 1797, 0
    per_epoch = n // BATCH
    worlds = set()
    for k in sorted(counted):
        parts = sorted(counted[k], key=lambda r: r["rank"])
        world = parts[0]["world"]
        worlds.add(world)
        assert [r["rank"] for r in parts] == list(range(world)) and all(r["world"] == world for r in parts), (k, parts)
        ids = sum((r["ids"] for r in parts), [])
        epoch, i = divmod(k, per_epoch)
        expect = order.permutation(n, seed, epoch)[i * BATCH:(i + 1) * BATCH]
        assert np.array_equal(ids, expect), (k, world)
    assert worlds == {2, 3}
    assert sorted(counted) == list(range(max(counted) + 1))  # every batch up to the end, none missing
    epochs = max(counted) // per_epoch
    print(f"\nelastic: killed a node at step {killed_step}, training on two workers {on_two_after:.1f} s later, "
          f"grew back to three; {steps} steps, {epochs} whole epochs read exactly once, in "
          f"{time.monotonic() - t0:.0f} s")
