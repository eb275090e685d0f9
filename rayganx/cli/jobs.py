"""Jobs: validate, run here, submit to a cluster (Ray Jobs API), follow, list and stop them;
the built-in datasets."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import typer
from rich.table import Table

from rayganx.job import spec as jobspec
from rayganx.cli.base import (AddressOpt, AllowChangesOpt, EndpointOpt, ForceOpt, OnClusterOpt, STATE, SetOpt, app,
                              command, data_app, err, out, warn)
from rayganx.cli.display import RunDisplay, print_run_summary, when


@app.command()
@command
def validate(job: str, set_: Optional[list[str]] = SetOpt):
    """Check a job file and print the fully resolved spec (defaults filled in)."""
    spec = jobspec.load(job, set_)
    sys.stdout.write(spec.to_yaml())


def _run_here(spec: jobspec.JobSpec, force: bool = False, allow_changes: bool = False) -> None:
    from rayganx.training import runner, stopping
    from rayganx.store.runs import list_checkpoints
    from rayganx.store.storage import Store

    display = RunDisplay(spec.name)
    t0 = time.monotonic()
    try:
        result = runner.run(spec, verbose=STATE["verbose"], printer=display.update, on_start=display.start,
                            force=force, notify=warn, allow_changes=allow_changes)
    except KeyboardInterrupt:
        display.stop()
        ckpts = list_checkpoints(Store(runner.resolve_paths(spec).run_url, spec.storage.endpoint_url), warn=False)
        where = f"step {ckpts[-1]['step']}" if ckpts else "the start (no checkpoint yet)"
        by = "" if stopping.STOPPED_BY[0] == "SIGINT" else f" by {stopping.STOPPED_BY[0]}"
        err.print(f"[yellow]interrupted{by}[/yellow]: {spec.name} stopped; submit the same job again to continue "
                  f"from {where}", highlight=False, soft_wrap=True)
        # Everything that must happen has: the workers are stopped, the lock released, the user
        # told. Exit now rather than wait on threads Ray or Ray Train left behind at shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    finally:
        display.stop()
    print_run_summary(spec.name, result, time.monotonic() - t0)


@app.command()
@command
def submit(job: str, set_: Optional[list[str]] = SetOpt,
           address: Optional[str] = AddressOpt,
           follow: bool = typer.Option(False, "--follow", "-f", help="stream logs until the job ends"),
           paths_on_cluster: bool = OnClusterOpt, force: bool = ForceOpt,
           allow_changes: bool = AllowChangesOpt):
    """Run a job: on an embedded local Ray, or on a cluster through the Jobs API with --address
    (the job travels with every --set applied; datasets never do)."""
    spec = jobspec.load(job, set_)
    address = address or jobs_address_from_env()
    if address:
        from rayganx.ops import remote

        job_id = remote.submit(spec, address, paths_on_cluster, force, allow_changes)
        out.print(f"submitted {job_id} to {address}", highlight=False)
        if not follow:
            out.print(f"follow it with: rayganx logs {job_id} --follow --address {address}", highlight=False)
            return
        follow_job(address, job_id)
        return
    _run_here(spec, force, allow_changes)


def follow_job(address: str, job_id: str) -> None:
    from rayganx.ops import remote

    state = remote.follow(address, job_id, lambda chunk: (sys.stdout.write(chunk), sys.stdout.flush()))
    (out if state == "SUCCEEDED" else err).print(f"{job_id}: {state}", highlight=False)
    if state != "SUCCEEDED":
        raise typer.Exit(1)


def jobs_address_from_env() -> str | None:
    import os

    addr = os.environ.get("RAY_ADDRESS", "")
    return addr if addr.startswith(("http://", "https://")) else None


def need_address(address: str | None) -> str:
    address = address or jobs_address_from_env()
    if not address:
        raise jobspec.SpecError("--address: no cluster given (or set RAY_API_SERVER_ADDRESS / RAY_ADDRESS)")
    return address


@app.command()
@command
def status(job_id: Optional[str] = typer.Argument(None, help="submission id (default: the newest rayganx job)"),
           address: Optional[str] = AddressOpt):
    """The state of a job on a cluster."""
    from rayganx.ops import remote

    address = need_address(address)
    if job_id is None:
        jobs = remote.list_jobs(address)
        if not jobs:
            out.print(f"no rayganx jobs on {address}")
            return
        job_id = jobs[0].submission_id
    info = remote.info(address, job_id)
    out.print(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""), highlight=False)


@app.command()
@command
def logs(job_id: str, follow: bool = typer.Option(False, "--follow", "-f"), address: Optional[str] = AddressOpt):
    """A job's logs; --follow streams them until the job ends."""
    from rayganx.ops import remote

    address = need_address(address)
    if follow:
        follow_job(address, job_id)
    else:
        sys.stdout.write(remote.logs(address, job_id))


@app.command()
@command
def stop(job_id: str, address: Optional[str] = AddressOpt):
    """Stop a running job."""
    from rayganx.ops import remote

    address = need_address(address)
    remote.stop(address, job_id)
    out.print(f"stop requested for {job_id}", highlight=False)


@app.command("list")
@command
def list_cmd(address: Optional[str] = AddressOpt):
    """A table of the rayganx jobs on a cluster."""
    from rayganx.ops import remote

    address = need_address(address)
    table = Table(title=f"rayganx jobs on {address}")
    for col in ("submission id", "job", "status", "started", "duration"):
        table.add_column(col)
    for j in remote.list_jobs(address):
        start, end = (j.start_time or 0) / 1000, (j.end_time or 0) / 1000
        dur = (end or time.time()) - start if start else 0
        table.add_row(j.submission_id, j.metadata.get("rayganx_job", ""), j.status.value, when(start),
                      f"{dur:.0f} s")
    out.print(table)


@app.command("run")
@command
def run_cmd(job: str, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt,
            allow_changes: bool = AllowChangesOpt):
    """Run a job in this process on the Ray cluster it is started in (the Jobs API entrypoint)."""
    _run_here(jobspec.load(job, set_), force, allow_changes)


@data_app.command("prepare")
@command
def data_prepare(source: str = typer.Argument(..., help="digits (built in), or an image folder or a .zip of one "
                                                        "(local or URL), e.g. img_align_celeba.zip"),
                 out_dir: str = typer.Option(..., "--out", help="directory or URL to write"),
                 fmt: str = typer.Option("folder", "--format", help="digits only: folder | parquet"),
                 size: Optional[int] = typer.Option(None, "--size", help="image size in pixels (digits 32, else 64)"),
                 crop: Optional[int] = typer.Option(None, "--crop", help="centre crop before resizing (CelebA: 108)"),
                 channels: int = typer.Option(3, "--channels", help="1 (grey) or 3 (RGB)"),
                 labels: bool = typer.Option(False, "--labels", help="a label column from the class sub-folders"),
                 partition: Optional[str] = typer.Option(
                     None, "--partition", help="a split column from a partition file (CelebA's list_eval_partition.txt)"),
                 shard_mb: float = typer.Option(256.0, "--shard-mb", help="Parquet shard size in MB"),
                 address: Optional[str] = typer.Option(None, "--address", help="a Ray cluster (ray://, host:port) to "
                                                                             "prepare on; default: this machine"),
                 endpoint_url: Optional[str] = EndpointOpt):
    """Write a dataset in the formats training reads fast: your own image folder or zip as Parquet shards
    (cropped and resized once, resumable), or the built-in digits as a folder or Parquet."""
    from rayganx.data.sources import DataError
    from rayganx.data.prepare import prepare_digits

    if source == "digits":
        n = prepare_digits(out_dir, fmt, size or 32, endpoint_url)
        out.print(f"wrote {n} digits images ({fmt}, {size or 32}x{size or 32}) to {out_dir}")
        return
    if channels not in (1, 3):
        raise DataError(f"--channels: 1 or 3, got {channels}")
    if shard_mb <= 0:
        raise DataError(f"--shard-mb: must be positive, got {shard_mb:g}")
    from rich.progress import Progress

    from rayganx.data import prepare
    from rayganx.job.cluster import init_ray

    if address:
        init_ray(address=address)
    settings = prepare.Settings(size=size or 64, crop=crop, channels=channels, labels=labels, shard_mb=shard_mb,
                                partition=partition)
    p = prepare.plan(source, settings, endpoint_url)
    out.print(f"{len(p.members)} images from {source} -> {p.shards} shard(s) of up to {p.rows_per_shard} images",
              highlight=False)
    try:
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("shards", total=p.shards)
            manifest = prepare.run(p, out_dir, progress=lambda done, total: bar.update(task, completed=done))
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: the shards written so far are kept; the same command again writes "
                  "only the missing ones", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    if manifest["corrupt"]:
        warn(f"skipped {len(manifest['corrupt'])} corrupt image(s): {', '.join(manifest['corrupt'][:5])}"
             + (" ..." if len(manifest["corrupt"]) > 5 else ""))
    out.print(f"wrote {manifest['rows']} images ({manifest['bytes'] / 2**20:.1f} MB in {len(manifest['shards'])} "
              f"shards, content {manifest['content_sha256'][:12]}) to {out_dir}", highlight=False)
