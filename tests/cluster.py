"""Real Ray clusters on this machine for the tests: nodes as separate `ray start --block` process
groups (own ports, own temp dir), of which only these are ever killed."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import psutil

# The venv's own `ray`, whether or not the venv is activated.
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A head and, for tests about nodes, worker nodes. Token auth (Ray's default for local clusters)
    is said to every node joining and to every driver (`driver_env`)."""

    def __init__(self, **env: str):
        self.temp = tempfile.mkdtemp(prefix="rgx", dir="/tmp")  # short: socket paths must fit 107 bytes
        self.port = free_port()
        self.dashboard_port = free_port()
        self.metrics_port = free_port()
        self.nodes: list[subprocess.Popen] = []
        # Job entrypoints run `python -m rayganx.cli` from the head's PATH: this venv's, activated or not.
        path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        self.env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", **env}

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def driver_env(self) -> dict:
        """What a driver (a CLI process, a `rayganx run`) needs to join this cluster."""
        return {"RAY_ADDRESS": self.gcs, "RAY_AUTH_MODE": "token"}

    def _start(self, args: list[str]) -> subprocess.Popen:
        temp = os.path.join(self.temp, f"n{len(self.nodes)}")
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
             "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=self.env)
        self.nodes.append(proc)
        return proc

    def start_head(self, num_cpus: int = 0, object_store: int | None = None) -> None:
        self._start(["--head", f"--port={self.port}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                     f"--metrics-export-port={self.metrics_port}"]
                    + ([f"--object-store-memory={object_store}"] if object_store else []))
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # 401 without a token: the server is up
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("the Ray head did not start")

    def add_node(self, num_cpus: int = 2) -> str:
        """A worker node; returns its node id."""
        proc = self._start([f"--address={self.gcs}", f"--num-cpus={num_cpus}", "--object-store-memory=150000000",
                            f"--metrics-export-port={free_port()}"])
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

    def kill_node(self, node_id: str) -> None:
        """The node dies the way a lost machine or pod does: its raylet killed by PID."""
        for proc in self.nodes:
            if self.node_id(proc) == node_id:
                for raylet in self.raylets(proc):
                    raylet.kill()
                return
        raise AssertionError(f"no node {node_id}")

    def stop(self) -> None:
        for proc in reversed(self.nodes):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # it drains for up to 30 s; nothing here needs draining
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        # Ray's own daemons that left the process groups (log monitor, agents) and any stray worker.
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp in arg for arg in (p.info["cmdline"] or [])):
                    p.kill()
            except psutil.Error:
                pass
        subprocess.run(["rm", "-rf", self.temp], check=False)
