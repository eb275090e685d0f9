import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray instance for the whole test session (3 logical CPUs on 2 cores)."""
    from rayganx.runner import init_ray

    import ray

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


def tiny(name: str, storage: Path, steps: int = 6, **sections) -> dict:
    """Overrides that make any job run a few steps quickly into a test folder."""
    train = {"steps": steps, "log_every": 2, **sections.pop("train", {})}
    return {"name": name, "storage": {"path": str(storage), "checkpoint_every": max(1, steps // 2), "keep": 2},
            "samples": {"every": steps, "n": 16}, "train": train, **sections}


def rayganx(*args, env=None, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "rayganx.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd or ROOT)
