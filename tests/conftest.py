import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# The session's head (ray_head) uses token auth, Ray's default for local clusters: this process and
# the CLI processes it starts say so before Ray is imported (embedded Rays then use it too).
os.environ["RAY_AUTH_MODE"] = "token"
# Test credentials for the moto server, set before Ray starts so its workers inherit them the way
# cluster nodes get theirs (environment, profile, instance role). Distinctive, so tests can grep.
TEST_KEY_ID, TEST_SECRET = "AKIARAYGANXTESTKEY01", "rayganx-test-secret-7f3c9a1e"
os.environ.update(AWS_ACCESS_KEY_ID=TEST_KEY_ID, AWS_SECRET_ACCESS_KEY=TEST_SECRET,
                  AWS_DEFAULT_REGION="us-east-1")
for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(var, None)


# Fixtures that start real Ray (training, a head for the Jobs API): a test that uses one is slow.
SLOW_FIXTURES = {"ray_session", "ray_head", "on_head", "s3_run", "cgan_run", "classifier_ckpt"}


def pytest_collection_modifyitems(items):
    """`pytest -m "not slow"` is the quick loop; CI runs everything."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _bad_skips(reporter) -> list:
    """Skips whose reason could hold on this machine: all but those for a missing GPU."""
    return [r for r in (reporter.stats.get("skipped", []) if reporter else []) if "GPU" not in str(r.longrepr)]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get("CI") == "true" and _bad_skips(terminalreporter):
        terminalreporter.write_line(f"CI: {len(_bad_skips(terminalreporter))} test(s) skipped for a reason that "
                                    f"holds on this machine; a skip fails CI", red=True)


def pytest_sessionfinish(session, exitstatus):
    """In CI a skipped test is a failure unless its reason cannot hold here (a GPU)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("CI") == "true" and session.exitstatus == 0 and _bad_skips(reporter):
        session.exitstatus = 1


# KubeRay v1.7.0's CRDs, shipped with the tests (tests/fixtures/kuberay/README.md).
KUBERAY_CRDS = {"ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
                "ray.io_rayjobs.yaml": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"}


@pytest.fixture(scope="session")
def kuberay_crds(tmp_path_factory) -> Path:
    """The CRD files, unpacked and checked against their release's checksums."""
    import gzip
    import hashlib

    folder = tmp_path_factory.mktemp("kuberay")
    for name, sha in KUBERAY_CRDS.items():
        data = gzip.decompress((ROOT / "tests" / "fixtures" / "kuberay" / f"{name}.gz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == sha, f"{name}: not the KubeRay v1.7.0 file"
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on loopback (moto), with one bucket; yields its endpoint."""
    import threading

    import boto3
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    # moto checks a write's condition (If-None-Match, If-Match) and then writes, unlocked: two
    # requests at once can both pass. S3 decides a conditional write atomically; the run lock's
    # tests race eight takers on it, so the server here keeps S3's guarantee.
    writes = threading.Lock()
    for name in ("put_object", "delete_object"):
        def atomic(self, _write=getattr(S3Response, name)):
            with writes:
                return _write(self)
        setattr(S3Response, name, atomic)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="rayganx-test")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_head():
    """One real Ray head (`ray start --head`, 3 logical CPUs on 2 cores) for the whole test run: the
    cluster this process trains on, the Jobs API the remote tests submit to, and the cluster CLI
    processes join (`on_head`) unless the test is about the embedded start.

    Many runs share it: idle workers stay (Ray's default kills those over the CPU count after
    1 s), so each run's Ray Data tasks find processes that imported Ray Data and pandas already."""
    from tests.cluster import Cluster

    head = Cluster(RAY_idle_worker_killing_time_threshold_ms="600000", RAY_num_workers_soft_limit="10",
                   RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    try:
        head.start_head(num_cpus=3)
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """This process as a driver on the session's head."""
    import ray

    from rayganx.job.cluster import init_ray

    init_ray(address=ray_head.gcs)
    yield ray
    ray.shutdown()


@pytest.fixture
def on_head(ray_head) -> dict:
    """The environment that makes a CLI process join the session's head instead of starting its
    own Ray (the embedded start is tested where it is the point)."""
    return ray_head.driver_env()


def write_job(path: Path, base: str | None = None, **sections) -> Path:
    """A job YAML from a base job in jobs/ with sections updated (nested dicts merge)."""
    raw = yaml.safe_load((JOBS / base).read_text()) if base else {}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def local_checkpoint(path: Path, task, step: int, num_classes=None) -> Path:
    """A checkpoint folder as a run writes it (files, then the completion marker), without Ray."""
    import json

    import torch

    from rayganx.store.runs import MARKER, checkpoint_manifest
    from rayganx.training.checkpointing import save_checkpoint

    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(path), task.spec, task.state_dict(), step, {"step": step}, num_classes, [{"torch": torch.get_rng_state()}], None)
    (path / MARKER).write_text(json.dumps(checkpoint_manifest(str(path), step)))
    return path


def tiny(name: str, storage: Path, steps: int = 6, **sections) -> dict:
    """Overrides that make any job run a few steps quickly into a test folder."""
    train = {"steps": steps, "log_every": 2, **sections.pop("train", {})}
    return {"name": name, "storage": {"path": str(storage), "checkpoint_every": max(1, steps // 2), "keep": 2},
            "samples": {"every": steps, "n": 16}, "train": train, **sections}


def rayganx(*args, env=None, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a new process (forked from one that imported torch: tests/forked_cli.py)."""
    from tests import forked_cli

    return forked_cli.run(list(map(str, args)), {**os.environ, **(env or {})}, cwd or ROOT, timeout)
