"""rayganx as a user gets it: the built wheel in a fresh virtual environment outside the repository,
with no ../shared anywhere near it."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from tests.conftest import JOBS, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv():
    root = Path(tempfile.mkdtemp(prefix="rgxvenv", dir="/tmp"))
    try:
        src = root / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, src / name)
        shutil.copytree(ROOT / "rayganx", src / "rayganx", ignore=shutil.ignore_patterns("__pycache__"))
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
             root / "wheels", src])
        wheel = next((root / "wheels").glob("rayganx-*.whl"))
        env_dir = root / "venv"
        run([sys.executable, "-m", "venv", "--without-pip", env_dir])
        # Nothing downloads here: the dependencies come from the environment running the tests. A
        # .pth line is searched after the venv's own site-packages, and the .pth files of the
        # directory it names (the editable install of the checkout) are not read.
        site = next((env_dir / "lib").glob("python3*/site-packages"))
        (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        run([sys.executable, "-m", "pip", "--python", env_dir / "bin" / "python", "install", "--quiet",
             "--no-deps", "--no-index", wheel])
        home = root / "home"
        home.mkdir()
        (home / "kubeconfig").write_text("apiVersion: v1\nkind: Config\n")  # kubectl may be there; no context
        shutil.copy(JOBS / "dcgan_celeba.yaml", home / "dcgan_celeba.yaml")
        yield {"bin": env_dir / "bin", "home": home}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, **kw):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, **kw)


def user(venv, *args):
    """The installed command, run in a home folder outside the repository, as a new user would."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAYGANX_KUBERAY_CRDS", "VIRTUAL_ENV")}
    env |= {"HOME": str(venv["home"]), "XDG_CACHE_HOME": str(venv["home"] / ".cache"),
            "KUBECONFIG": str(venv["home"] / "kubeconfig"), "PATH": f"{venv['bin']}:{env.get('PATH', '')}"}
    return subprocess.run([str(venv["bin"] / "rayganx"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=venv["home"], timeout=300)


def test_the_wheel_is_what_runs(venv):
    r = subprocess.run([str(venv["bin"] / "python"), "-c", "import rayganx; print(rayganx.__file__)"],
                       capture_output=True, text=True, cwd=venv["home"],
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0 and r.stdout.startswith(str(venv["bin"].parent)), r.stdout + r.stderr
    r = user(venv, "--version")
    assert r.returncode == 0 and r.stdout.strip() == "0.1.0"


def test_render_and_validate_from_a_pip_install(venv, kuberay_crds):
    CRDS = kuberay_crds
    job = ["dcgan_celeba.yaml", "--image", "REG/rayganx:0.1", "--set", "storage.path=s3://bucket/runs",
           "--set", "data.path=s3://bucket/celeba", "--set", "scaling.num_workers=4"]
    r = user(venv, "k8s", "render", *job, "--out", "rayjob.yaml")
    assert r.returncode == 0, r.stderr
    assert "not checked against the KubeRay CRD schemas" in r.stderr
    r = user(venv, "k8s", "validate", "rayjob.yaml")
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr.startswith("error: no KubeRay CRD schemas to validate against")
    r = user(venv, "k8s", "validate", "rayjob.yaml", "--crds", CRDS)
    assert r.returncode == 0 and "1 manifest file(s) valid" in r.stdout, r.stdout + r.stderr
    r = user(venv, "k8s", "render", *job, "--crds", CRDS, "--out", "checked.yaml")
    assert r.returncode == 0 and "not checked against" not in r.stderr, r.stderr
