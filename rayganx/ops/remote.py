"""Jobs on a remote Ray cluster through the Ray Jobs API (the dashboard's HTTP server).

The job, resolved here with every --set applied (its ${VAR} placeholders kept, their values from
this machine in the job's environment), travels in the runtime environment's working_dir, rayganx
itself in py_modules, and the entrypoint runs `rayganx run` on the cluster. Datasets never travel:
they are read from object storage or from a path that exists on the cluster.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from rayganx import __version__
from rayganx.job.errors import UserError
from rayganx.job.spec import JobSpec
from rayganx.store.storage import is_remote


class RemoteError(UserError, RuntimeError):
    """A cluster or Jobs API problem, in one line."""


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _token_source() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    if (Path.home() / ".ray" / "auth_token").is_file():
        return "~/.ray/auth_token"
    return None


def client(address: str):
    """A JobSubmissionClient that sends the cluster token from the usual places."""
    import logging

    # Keep upload/packaging chatter out of the terminal (the SDK sets INFO on its own logger).
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    source = _token_source()
    if source:
        # Ray's client only reads a token when told the cluster uses token auth.
        if not os.environ.get("RAY_AUTH_MODE"):
            os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ray raises ConnectionError, AuthenticationError, RuntimeError...
        raise _explain(address, e, source) from None


def _explain(address: str, e: Exception, source: str | None) -> RemoteError:
    text = str(e)
    if "Invalid authentication token" in text or "Forbidden" in text:
        return RemoteError(f"{address}: the cluster rejected the auth token from {source or 'the environment'}")
    if "authentication token" in text.lower() or type(e).__name__ == "AuthenticationError":
        return RemoteError(f"{address}: the cluster requires an auth token; set RAY_AUTH_TOKEN or "
                           f"RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token")
    if isinstance(e, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return RemoteError(f"{address}: cannot reach the Ray Jobs API (is the dashboard running there, "
                           f"port 8265 by default?)")
    return RemoteError(f"{address}: does not serve the Ray Jobs API ({type(e).__name__}: "
                       f"{text.splitlines()[0][:200] if text else ''})")


def _call(address: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        text = str(e)
        if "does not exist" in text or "404" in text:
            raise RemoteError(f"{address}: no job {args[0] if args else ''!s} on this cluster") from None
        raise _explain(address, e, _token_source()) from None
    except Exception as e:
        raise _explain(address, e, _token_source()) from None


LOCAL_HINT = ("put it in object storage (--set {key}=s3://BUCKET/...), or, if the path exists as written on "
              "every node of the cluster (a volume they all mount), say so with --paths-on-cluster")


def path_problems(spec: JobSpec, paths_on_cluster: bool, storage: str | None = None) -> list[str]:
    """Local paths a remote cluster cannot use. Datasets never travel with a job (the Jobs API caps
    the working directory at a few hundred MiB), and a local run store would land in the head's
    temporary job directory."""
    out = []
    for key, value in (spec.paths() | ({"storage.path": storage} if storage else {})).items():
        if is_remote(value):
            continue
        if not paths_on_cluster:
            out.append(f"{key}: {value!r} is a path on this machine, which the cluster cannot read; "
                       + LOCAL_HINT.format(key=key))
        elif not os.path.isabs(value):
            out.append(f"{key}: {value!r} is relative, so on the cluster it would resolve inside the job's "
                       f"temporary working directory; give an absolute path on the cluster")
    return out


def job_env(*specs: JobSpec) -> dict[str, str]:
    """This machine's values of the variables the job's ${VAR} placeholders name: the cluster
    resolves the placeholders to what was checked here (credential variables never get this far)."""
    from rayganx.job.config import ENV_REF, SECRET_ENV

    names = {var for s in specs for t in s._templates.values() for var, _ in ENV_REF.findall(t)}
    return {n: os.environ[n] for n in sorted(names) if n in os.environ and not SECRET_ENV.search(n)}


def package_job(spec: JobSpec) -> str:
    """A working_dir holding only the job, exactly as it will run (every --set applied here)."""
    workdir = tempfile.mkdtemp(prefix="rayganx_job_")
    Path(workdir, "job.yaml").write_text(spec.to_yaml())
    return workdir


def job_metadata(spec: JobSpec, run_url: str | None = None) -> dict[str, str]:
    """What the Ray dashboard's job page shows to recognise the job (`job_name` is the name its
    job list shows and filters by). Values are strings: the Jobs API takes nothing else."""
    raw = spec.to_dict()  # ${VAR} placeholders kept: the cluster resolves them, and they ship as written
    data = raw["data"]["source"] + (f" {raw['data']['path']}" if raw["data"].get("path") else "")
    run = run_url or str(raw["storage"]["path"]).rstrip("/") + "/" + spec.name
    return {"job_name": spec.name, "rayganx_job": spec.name, "rayganx_version": __version__,
            "model": spec.model.kind, "data": data, "run": run}


def _submit(address: str, name: str, workdir: str, entrypoint: str, env: dict[str, str],
            metadata: dict | None = None) -> str:
    import rayganx

    c = client(address)
    submission_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runtime_env = {"working_dir": workdir, "py_modules": [os.path.dirname(rayganx.__file__)],
                   "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", **env}}
    kwargs = dict(entrypoint=entrypoint, submission_id=submission_id,
                  runtime_env=runtime_env, entrypoint_num_cpus=0,
                  metadata={"rayganx_job": name, "rayganx_version": __version__} | (metadata or {}))
    try:
        for attempt in range(30):
            try:
                return c.submit_job(**kwargs)
            except RuntimeError as e:
                # A head that has just started has no job agent for a few seconds.
                if "No available agent" not in str(e) or attempt == 29:
                    raise _explain(address, e, _token_source()) from None
                time.sleep(1)
    except Exception as e:
        if isinstance(e, RemoteError):
            raise
        raise _explain(address, e, _token_source()) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def submit(spec: JobSpec, address: str, paths_on_cluster: bool = False, force: bool = False,
           allow_changes: bool = False) -> str:
    """Submit a job; returns its submission id (job name plus time)."""
    problems = path_problems(spec, paths_on_cluster)
    if problems:
        raise RemoteError("\n".join(problems))
    entry = ("python -m rayganx.cli run job.yaml" + (" --force" if force else "")
             + (" --allow-changes" if allow_changes else ""))
    return _submit(address, spec.name, package_job(spec), entry, job_env(spec), job_metadata(spec))


def package_sweep(sweep) -> str:
    """A working_dir holding the sweep with its base job inline."""
    workdir = tempfile.mkdtemp(prefix="rayganx_sweep_")
    raw = sweep.spec.model_dump(mode="json", exclude_none=True)
    raw["job"] = sweep.base_raw
    raw["space"] = sweep.spec.space  # as written: the included spaces are named in `include`
    Path(workdir, "sweep.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return workdir


def submit_sweep(sweep, address: str, resume: bool = False, paths_on_cluster: bool = False,
                 trust_state: bool = False) -> str:
    """Submit `rayganx tune` to a cluster; returns its submission id."""
    problems = path_problems(sweep.base, paths_on_cluster, sweep.storage)
    if problems:
        raise RemoteError("\n".join(problems))
    entry = ("python -m rayganx.cli tune sweep.yaml" + (" --resume" if resume else "")
             + (" --trust-sweep-state" if trust_state else ""))
    meta = job_metadata(sweep.base, sweep.root) | {"job_name": sweep.spec.name, "rayganx_job": sweep.spec.name}
    return _submit(address, sweep.spec.name, package_sweep(sweep), entry, job_env(sweep.base), meta)


def status(address: str, job_id: str) -> str:
    return str(_call(address, client(address).get_job_status, job_id).value)


def info(address: str, job_id: str):
    return _call(address, client(address).get_job_info, job_id)


def logs(address: str, job_id: str) -> str:
    return _call(address, client(address).get_job_logs, job_id)


def stop(address: str, job_id: str) -> bool:
    return _call(address, client(address).stop_job, job_id)


def list_jobs(address: str) -> list:
    """rayganx jobs on the cluster, newest first."""
    jobs = _call(address, client(address).list_jobs)
    ours = [j for j in jobs if (j.metadata or {}).get("rayganx_job")]
    return sorted(ours, key=lambda j: j.start_time or 0, reverse=True)


def follow(address: str, job_id: str, write) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    c = client(address)
    _call(address, c.get_job_status, job_id)  # a clear error for an unknown id

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())
    for _ in range(60):  # the log stream closes a moment before the status settles
        state = str(c.get_job_status(job_id).value)
        if state in TERMINAL:
            return state
        time.sleep(0.5)
    return state
