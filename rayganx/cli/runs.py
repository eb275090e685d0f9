"""What runs left in storage: runs, checkpoints, comparisons, TensorBoard, the Grafana dashboard."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.table import Table

from rayganx.job import spec as jobspec
from rayganx.cli.base import EndpointOpt, app, ckpt_app, command, emit, err, out, runs_app
from rayganx.cli.display import compare_table, fmt_metrics, size, when


def run_location(run: str, endpoint_url: str | None) -> tuple[str, str | None]:
    """A run URL, or the run a job file describes."""
    if run.endswith((".yaml", ".yml")):
        from rayganx.training.runner import resolve_paths

        spec = resolve_paths(jobspec.load(run))
        return spec.run_url, spec.storage.endpoint_url or endpoint_url
    return run, endpoint_url


@runs_app.command("list")
@command
def runs_list(storage: str = typer.Argument(..., help="storage location (path or URL)"),
              endpoint_url: Optional[str] = EndpointOpt):
    """A table of the runs found in a storage location."""
    from rayganx.store.runs import list_runs
    from rayganx.store.storage import Store

    runs = list_runs(Store(storage, endpoint_url))
    table = Table(title=f"runs in {storage}")
    for col in ("name", "model", "last step", "last update", "latest metrics"):
        table.add_column(col)
    for r in runs:
        table.add_row(r["name"], r["model"], str(r["step"] or "-"), when(r["time"]), fmt_metrics(r["metrics"]))
    out.print(table if runs else f"no runs in {storage}")


@runs_app.command("compare")
@command
def runs_compare(runs: list[str] = typer.Argument(..., help="runs (paths or URLs); a sweep's folder stands for its trials"),
                 out_png: str = typer.Option("compare.png", "--out", help="PNG with the curves and last sample grids"),
                 endpoint_url: Optional[str] = EndpointOpt):
    """Runs side by side: the spec keys that differ, latest and best metrics, and a PNG of their
    curves on shared axes with their last sample grids."""
    from rayganx.ops import compare

    views = compare.load_runs(compare.expand([run_location(r, endpoint_url)[0] for r in runs], endpoint_url))
    if len(views) < 2:
        raise jobspec.SpecError("runs compare: name at least two runs (or a sweep); `rayganx runs show RUN` shows one")
    diff = compare.spec_diff(views)
    out.print(compare_table(views, f"{len(views)} runs: spec keys that differ (cyan), latest metrics "
                                    f"(best @ step)", diff))
    compare.figure(views, out_png)
    out.print(f"wrote {out_png}", highlight=False)


@runs_app.command("show")
@command
def runs_show(run: str = typer.Argument(..., help="run URL or path, or the job YAML"),
              out_png: Optional[str] = typer.Option(None, "--out", help="also write a PNG of its curves and last grid"),
              endpoint_url: Optional[str] = EndpointOpt):
    """One run: its spec (keys set away from the defaults), latest and best metrics, checkpoints,
    evaluation history and divergence rollbacks."""
    from rayganx.ops import compare
    from rayganx.store.storage import Store

    url, endpoint = run_location(run, endpoint_url)
    (view,) = compare.load_runs([Store(url, endpoint)])
    out.print(compare_table([view], f"{view.name}: spec keys set away from the defaults (cyan), latest metrics "
                                     f"(best @ step)", [(k, [v]) for k, v in compare.non_default(view)]))
    _attempts(Store(url, endpoint), view)
    if view.checkpoints:
        table = Table(title="checkpoints")
        for col in ("step", "time", "size", "metrics"):
            table.add_column(col)
        for c in view.checkpoints:
            table.add_row(str(c["step"]), when(c["time"]), size(c["size"]), fmt_metrics(c["metrics"]))
        out.print(table)
    evals = [r for r in view.rows if any(k in r for k in compare.EVAL)]
    if evals:
        keys = [k for k in compare.EVAL if any(k in r for r in evals)]
        table = Table(title="evaluation history")
        for col in ("step", *keys):
            table.add_column(col, justify="right")
        for r in evals:
            table.add_row(str(r["step"]), *(compare.fmt(r.get(k)) for k in keys))
        out.print(table)
    for e in view.events:
        out.print(f"{e['event']} at step {e['step']}: {e.get('reason') or e.get('note', '')}", highlight=False,
                  soft_wrap=True)
    if out_png:
        compare.figure([view], out_png)
        out.print(f"wrote {out_png}", highlight=False)


def _attempts(run, view) -> None:
    """Which steps ran under which spec: one line per attempt, with what it changed."""
    from rayganx.store.runs import spec_history
    from rayganx.job.continuation import changed_keys

    history = spec_history(run)
    if len(history) < 2:
        return
    last = max([r["step"] for r in view.rows if "step" in r], default=None)
    for i, h in enumerate(history):
        end = history[i + 1]["start_step"] if i + 1 < len(history) else last
        line = f"attempt {h['attempt']}: steps {h['start_step']}-{'' if end is None else end}, started {when(h.get('time'))}"
        if i:
            changes = changed_keys(history[i - 1]["spec"], h["spec"])
            line += "; " + ("; ".join(f"{k}: {a} -> {b}" for k, a, b in changes) if changes else "same spec")
        out.print(line, highlight=False, soft_wrap=True)


@ckpt_app.command("list")
@command
def checkpoints_list(run: str = typer.Argument(..., help="run URL, or the job YAML"),
                     endpoint_url: Optional[str] = EndpointOpt):
    """A table of a run's checkpoints."""
    from rayganx.store.runs import list_checkpoints
    from rayganx.store.storage import Store

    url, endpoint = run_location(run, endpoint_url)
    ckpts = list_checkpoints(Store(url, endpoint))
    table = Table(title=f"checkpoints of {url}")
    for col in ("step", "time", "size", "metrics", "url"):
        table.add_column(col)
    for c in ckpts:
        table.add_row(str(c["step"]), when(c["time"]), size(c["size"]), fmt_metrics(c["metrics"]), c["url"])
    out.print(table if ckpts else f"no checkpoints in {url}", soft_wrap=True)


@ckpt_app.command("pull")
@command
def checkpoints_pull(run: str = typer.Argument(..., help="run URL, or the job YAML"),
                     to: str = typer.Option(..., "--to", help="local directory"),
                     step: Optional[int] = typer.Option(None, "--step"),
                     latest: bool = typer.Option(False, "--latest", help="the newest checkpoint (default)"),
                     endpoint_url: Optional[str] = EndpointOpt):
    """Download one checkpoint of a run."""
    import os

    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from rayganx.store.runs import list_checkpoints, scan_checkpoints
    from rayganx.store.storage import Store, StorageError, download

    url, endpoint = run_location(run, endpoint_url)
    complete, incomplete = scan_checkpoints(Store(url, endpoint))
    if not complete:  # one line: why the newest folder is not a checkpoint to pull
        why = f" ({incomplete[-1]['name']}: {incomplete[-1]['reason']})" if incomplete else ""
        raise StorageError(f"{url}: no complete checkpoint{why}")
    ckpts = list_checkpoints(Store(url, endpoint))
    chosen = [c for c in ckpts if c["step"] == step] if step is not None else ckpts[-1:]
    if not chosen:
        raise StorageError(f"{url}: no checkpoint at step {step} (have {', '.join(str(c['step']) for c in ckpts)})")
    c = chosen[0]
    dest = os.path.join(to, c["name"])
    with Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task(c["name"], total=c["size"] or None)
        download(c["url"], dest, endpoint, progress=lambda done, total: bar.update(task, completed=done, total=total))
    out.print(f"pulled step {c['step']} to {dest}", soft_wrap=True)


@app.command()
@command
def tb(runs: list[str] = typer.Argument(..., help="runs or sweeps: paths or URLs"),
       port: int = typer.Option(6006, "--port", help="TensorBoard's port on 127.0.0.1 (0: a free one)"),
       cache: Optional[str] = typer.Option(None, "--cache", help="local copy of remote runs' event files "
                                                                 "(default ~/.cache/rayganx/tb)"),
       sync_every: float = typer.Option(30, "--sync-every", help="seconds between syncs of remote runs (0: once)"),
       endpoint_url: Optional[str] = EndpointOpt):
    """TensorBoard on one or more runs or sweeps. Remote runs' event files are synced to a local
    cache first (only new files), and again every --sync-every seconds while it serves."""
    from rayganx.ops import monitor

    logdirs = monitor.tb_logdirs(runs, endpoint_url, cache)
    if logdirs.remote:
        n = monitor.sync_all(logdirs)
        out.print(f"synced {n} new event file(s) to {logdirs.cache}", highlight=False)
    with monitor.tensorboard(logdirs.spec(), port) as url:
        out.print(f"TensorBoard at {url} (Ctrl-C to stop)", highlight=False)
        sys.stdout.flush()
        monitor.serve(logdirs, sync_every)


@app.command("grafana-dashboard")
@command
def grafana_dashboard(out_file: Optional[str] = typer.Option(None, "--out", help="write here instead of stdout")):
    """The Grafana dashboard JSON for rayganx's metrics (provision it in the Ray dashboard's Grafana)."""
    from rayganx.ops import grafana

    emit(grafana.to_json(), out_file)
