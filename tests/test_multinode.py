"""A real multi-node Ray cluster on this machine: a head and worker nodes, each its own `ray start`
(own ports and temp dir), runs stored on the moto S3 server. The driver runs as a subprocess
(`rayganx run` with RAY_ADDRESS), since this pytest process may hold a session-wide local Ray."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import yaml

from tests.conftest import JOBS, ROOT

# The venv's own `ray`, whether or not the venv is activated.
RAY = os.path.join(os.path.dirname(sys.executable), "ray")

pytestmark = pytest.mark.slow
BUCKET = "s3://rayganx-test/multinode"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Ray nodes as separate `ray start --block` process groups; only these are ever killed."""

    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="rgxm", dir="/tmp")  # short: socket paths must fit 107 bytes
        self.port = free_port()
        self.nodes: list[subprocess.Popen] = []
        # Node loss is noticed through GCS health checks: 1 s x 3 misses instead of 3 s x 5. Token
        # auth (Ray's default for local clusters) must be said to every node joining and to drivers.
        self.env = {**os.environ, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_initial_delay_ms": "1000", "RAY_AUTH_MODE": "token"}

    def _start(self, args: list[str]) -> subprocess.Popen:
        n = len(self.nodes)
        temp = os.path.join(self.temp, f"n{n}")
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
             "--object-store-memory=150000000", f"--metrics-export-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=self.env)
        self.nodes.append(proc)
        return proc

    def start_head(self):
        # No CPUs on the head, as on KubeRay (num-cpus: 0): Train workers go to the worker nodes.
        self._start(["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}", "--disable-usage-stats"])
        self.wait_nodes(1)

    def add_node(self) -> str:
        """A worker node with 2 CPUs (1 Train worker + 1 for Ray Data); returns its node id."""
        proc = self._start([f"--address=127.0.0.1:{self.port}", "--num-cpus=2"])
        deadline = time.time() + 60
        while time.time() < deadline:
            node_id = self.node_id(proc)
            if node_id:
                return node_id
            time.sleep(0.5)
        raise AssertionError("worker node did not start")

    def node_id(self, proc) -> str | None:
        for raylet in self.raylets(proc):
            for arg in raylet.cmdline():
                if arg.startswith("--node_id="):
                    return arg.split("=", 1)[1]
        return None

    def raylets(self, proc) -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "raylet"]
        except psutil.NoSuchProcess:
            return []

    def wait_nodes(self, n: int):
        deadline = time.time() + 60
        while time.time() < deadline:
            if sum(bool(self.raylets(p)) for p in self.nodes) >= n:
                return
            time.sleep(0.5)
        raise AssertionError(f"{n} Ray nodes did not start")

    def kill_raylet(self, node_id: str) -> None:
        """The node dies the way a lost machine or pod does: its raylet killed by PID."""
        for proc in self.nodes:
            if self.node_id(proc) == node_id:
                for raylet in self.raylets(proc):
                    raylet.kill()
                return
        raise AssertionError(f"no node {node_id}")

    def stop(self):
        for proc in reversed(self.nodes):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        # Ray's own daemons that left the process groups (log monitor, agents) and any stray worker.
        for p in psutil.process_iter(["cmdline"]):
            if any(self.temp in arg for arg in (p.info["cmdline"] or [])):
                p.kill()
        subprocess.run(["rm", "-rf", self.temp], check=False)


@pytest.fixture(scope="module")
def cluster(s3_server):
    c = Cluster()
    try:
        c.start_head()
        c.workers = [c.add_node(), c.add_node()]
        yield c
    finally:
        c.stop()


def job_file(tmp_path, name: str, s3_server: str, steps: int, checkpoint_every: int, log_every: int):
    raw = yaml.safe_load((JOBS / "dcgan_digits.yaml").read_text())
    raw.update(name=name, samples={"every": steps, "n": 16})
    raw["train"] |= {"steps": steps, "batch_size": 32, "log_every": log_every}
    raw["scaling"] |= {"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "max_failures": 2}
    raw["storage"] = {"path": BUCKET, "endpoint_url": s3_server, "checkpoint_every": checkpoint_every, "keep": 2}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def driver(cluster, job) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{cluster.port}", "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "rayganx.cli", "run", str(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=job.parent)


def s3(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server)


def rows(name: str, s3_server: str) -> list[dict]:
    """The run's metrics rows as rayganx reads them (listings always fresh), events left out."""
    from rayganx.runs import read_metrics
    from rayganx.storage import Store

    return [r for r in read_metrics(Store(f"s3://rayganx-test/multinode/{name}", s3_server)) if "event" not in r]


def checkpoint_steps(name: str, s3_server: str) -> list[int]:
    listing = s3(s3_server).list_objects_v2(Bucket="rayganx-test", Prefix=f"multinode/{name}/checkpoint_",
                                            Delimiter="/")
    return sorted(int(p["Prefix"].rstrip("/").rsplit("_", 1)[1]) for p in listing.get("CommonPrefixes", []))


def test_two_nodes_and_a_node_loss_resumes_from_the_last_checkpoint(cluster, s3_server, tmp_path):
    every, log_every, total = 20, 5, 200
    t0, started = time.monotonic(), time.time()
    proc = driver(cluster, job_file(tmp_path, "node_loss", s3_server, steps=total, checkpoint_every=every,
                                    log_every=log_every))
    try:
        deadline = time.time() + 240
        history: list[dict] = []
        while time.time() < deadline and proc.poll() is None:
            history = rows("node_loss", s3_server)
            if history and history[-1]["step"] > 2 * every:
                break
            time.sleep(0.2)
        assert proc.poll() is None and history, "the run ended before a node could be lost"
        first_step_s = history[0]["first_step_at"] - started
        placed = history[0]["node_ids"]  # rank 0 and rank 1, as the workers report them
        assert len(placed) == 2 and placed[0] != placed[1] and set(placed) <= set(cluster.workers), \
            (placed, cluster.workers)
        victim = placed[1]  # rank 1's node (rank 0 writes the run's files)
        killed_at = time.time()
        cluster.kill_raylet(victim)
        # Steps reached before the failure stopped training.
        seen = max(r["step"] for r in history)
        end = time.time() + 5
        while time.time() < end:
            seen = max([seen, *(r["step"] for r in rows("node_loss", s3_server))])
            time.sleep(0.5)
        last_ckpt = checkpoint_steps("node_loss", s3_server)[-1]
        # The replacement node (KubeRay would start a new pod): STRICT_SPREAD needs two nodes.
        new_node = cluster.add_node()
        node_back_at = time.time()
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    history = rows("node_loss", s3_server)
    starts = [r for r in history if "node_ids" in r]
    assert len(starts) == 2, [r["step"] for r in starts]
    assert history[-1]["step"] == total and [r["step"] for r in history] == sorted({r["step"] for r in history})
    again = starts[1]
    assert victim not in again["node_ids"] and new_node in again["node_ids"], (victim, new_node, again["node_ids"])
    resumed = again["step"] - log_every  # the first row after a restart comes log_every steps in
    # From the newest checkpoint in storage, or the one before when the newest was still uploading.
    assert last_ckpt - every <= resumed <= last_ckpt and resumed % every == 0, (resumed, last_ckpt)
    lost = seen - resumed
    assert 0 <= lost <= every, (seen, resumed)
    print(f"\nnode loss: first step {first_step_s:.1f} s after the driver started; killed at step {seen}; "
          f"replacement node up {node_back_at - killed_at:.1f} s after the kill; resumed from step {resumed} "
          f"({lost} steps lost, checkpoint_every {every}); training again {again['time'] - killed_at:.1f} s after "
          f"the kill; done in {time.monotonic() - t0:.1f} s")
