import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Test credentials for the moto server, set before Ray starts so its workers inherit them the way
# cluster nodes get theirs (environment, profile, instance role). Distinctive, so tests can grep.
TEST_KEY_ID, TEST_SECRET = "AKIARAYGANXTESTKEY01", "rayganx-test-secret-7f3c9a1e"
os.environ.update(AWS_ACCESS_KEY_ID=TEST_KEY_ID, AWS_SECRET_ACCESS_KEY=TEST_SECRET,
                  AWS_DEFAULT_REGION="us-east-1")
for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(var, None)


# Fixtures that start real Ray (training, a head for the Jobs API): a test that uses one is slow.
SLOW_FIXTURES = {"ray_session", "s3_run", "head", "classifier_ckpt"}


def pytest_collection_modifyitems(items):
    """`pytest -m "not slow"` is the quick loop; CI runs everything."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on loopback (moto), with one bucket; yields its endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="rayganx-test")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray instance for the whole test session (3 logical CPUs on 2 cores)."""
    from rayganx.cluster import init_ray

    import ray

    # Many runs share this Ray: idle workers stay (Ray's default kills those over the CPU count
    # after 1 s), so each run's Ray Data tasks find processes that imported Ray Data and pandas
    # already (dataset setup 5.6 s -> about 1 s a run on 2 cores). Set for this Ray's processes
    # only: the CLI's embedded Rays and `ray start` heads in other tests keep Ray's defaults.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_idle_worker_killing_time_threshold_ms", "600000")
        env.setenv("RAY_num_workers_soft_limit", "10")
        init_ray(num_cpus=3)
    yield ray
    ray.shutdown()


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

    from rayganx.runs import MARKER, checkpoint_manifest
    from rayganx.checkpointing import save_checkpoint

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
    """The CLI as a user runs it, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "rayganx.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd or ROOT)
