"""The `rayganx` command line."""

from __future__ import annotations

import functools
import sys
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from rayganx import __version__
from rayganx import spec as jobspec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed GAN and CNN training jobs on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in datasets.")
app.add_typer(data_app, name="data")
runs_app = typer.Typer(no_args_is_help=True, help="Runs in a storage location.")
app.add_typer(runs_app, name="runs")
ckpt_app = typer.Typer(no_args_is_help=True, help="A run's checkpoints.")
app.add_typer(ckpt_app, name="checkpoints")
k8s_app = typer.Typer(no_args_is_help=True, help="KubeRay manifests.")
app.add_typer(k8s_app, name="k8s")

# Wide when piped (job logs, CI), so URLs in tables and summaries stay whole.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
STATE = {"verbose": False}

SetOpt = typer.Option(None, "--set", help="override a job key: key.path=value (repeatable)")
AddressOpt = typer.Option(None, "--address", envvar=["RAY_API_SERVER_ADDRESS"],
                          help="Ray dashboard/Jobs API address (default: RAY_ADDRESS when it is http://...)")
OnClusterOpt = typer.Option(False, "--paths-on-cluster",
                            help="with --address: the job's local paths (data, storage) exist as written on every "
                                 "node of the cluster (a volume they all mount); without it they are refused")
EndpointOpt = typer.Option(None, "--endpoint-url", envvar="AWS_ENDPOINT_URL",
                           help="S3-compatible endpoint (MinIO, ...)")


def _user_errors() -> tuple[type[BaseException], ...]:
    from rayganx.crds import CrdError
    from rayganx.data import DataError
    from rayganx.k8s import ManifestError
    from rayganx.metrics import EvalError
    from rayganx.remote import RemoteError
    from rayganx.runner import RunError
    from rayganx.storage import StorageError

    return (jobspec.SpecError, RunError, StorageError, DataError, RemoteError, EvalError, ManifestError, CrdError)


def command(fn):
    """Known failures end as one red line and exit 1; --verbose adds the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except _user_errors() as e:
            if STATE["verbose"]:
                err.print_exception()
            for line in str(e).splitlines() or [type(e).__name__]:
                err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(e, "exit_code", 1))
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)
        except Exception as e:
            if STATE["verbose"]:
                err.print_exception()
            else:
                err.print(f"[red]error:[/red] {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                          f"(run with --verbose for details)", highlight=False, soft_wrap=True)
            raise typer.Exit(1)

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(__version__)
        raise typer.Exit()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's logs and tracebacks"),
          # Eager: `rayganx --version` alone answers instead of asking for a command.
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")):
    STATE["verbose"] = verbose
    import logging

    class _ToConsole(logging.Handler):  # the package's warnings, one yellow line each
        def emit(self, record):
            _warn(record.getMessage())

    pkg = logging.getLogger("rayganx")
    if not pkg.handlers:
        pkg.addHandler(_ToConsole(logging.WARNING))
        pkg.propagate = False
    _route_library_warnings()


def _route_library_warnings() -> None:
    """Python warnings from the libraries underneath (torchmetrics, torch, Ray, ...) speak of their
    internals, not of the user's job: shown dimmed with --verbose, dropped otherwise. rayganx's
    own warnings stay one yellow line."""
    import os
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package):
            _warn(str(message))
        elif STATE["verbose"]:
            err.print(f"{category.__name__} ({filename}:{lineno}): {message}", style="dim", markup=False,
                      highlight=False, soft_wrap=True)

    warnings.showwarning = show


# --------------------------------------------------------------------------- job commands


@app.command()
@command
def validate(job: str, set_: Optional[list[str]] = SetOpt):
    """Check a job file and print the fully resolved spec (defaults filled in)."""
    spec = jobspec.load(job, set_)
    sys.stdout.write(spec.to_yaml())


def _fmt_metrics(m: dict) -> str:
    keys = ("loss_d", "loss_g", "loss", "accuracy", "val_accuracy", "elbo", "fid", "kid", "cas",
            "synthetic_share")
    parts = [f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float))]
    if "images_per_s" in m:
        parts.append(f"{m['images_per_s']:.0f} img/s")
    return " | ".join(parts)


class _Display:
    """Live progress: a rich bar on a terminal, one plain line per report elsewhere (job logs)."""

    def __init__(self, name: str):
        self.name, self.progress, self.task, self.total = name, None, None, 0
        self.live = out.is_terminal

    def start(self, step: int, total: int):
        self.total = total
        if step >= total:
            out.print(f"{self.name}: already at step {step} of {total}; nothing to train "
                      f"(raise train.steps to continue)")
        elif step:
            out.print(f"{self.name}: resuming from step {step} of {total}")
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=out)
            self.progress.start()
            self.task = self.progress.add_task(self.name, total=total, completed=step, metrics="starting Ray Train")

    def update(self, m: dict):
        if m.get("event"):
            text = (f"rollback {m['rollback']} to step {m['step']}: {m['reason']}; learning rates x{m['lr_scale']:g}"
                    if m["event"] == "rollback" else f"{m['event']} at step {m['step']}: {m.get('note', '')}")
            (self.progress.console if self.progress else err).print(f"[yellow]warning:[/yellow] {text}",
                                                                   highlight=False, soft_wrap=True)
            return
        if self.progress:
            self.progress.update(self.task, completed=m["step"], metrics=_fmt_metrics(m))
        else:
            out.print(f"step {m['step']}/{self.total} | {_fmt_metrics(m)}", highlight=False, soft_wrap=True)

    def stop(self):
        if self.progress:
            self.progress.stop()


def _emit(text: str, out_file: str | None) -> None:
    """A command's document: to --out when given, else to stdout (for pipes)."""
    if out_file:
        with open(out_file, "w") as f:
            f.write(text)
        out.print(f"wrote {out_file}")
    else:
        sys.stdout.write(text)


def _warn(text: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {text}", highlight=False, soft_wrap=True)


def _run_here(spec: jobspec.JobSpec, force: bool = False) -> None:
    from rayganx import runner
    from rayganx.storage import Store, list_checkpoints

    display = _Display(spec.name)
    t0 = time.monotonic()
    try:
        result = runner.run(spec, verbose=STATE["verbose"], printer=display.update, on_start=display.start,
                            force=force, notify=_warn)
    except KeyboardInterrupt:
        display.stop()
        ckpts = list_checkpoints(Store(runner.resolve_paths(spec).run_url, spec.storage.endpoint_url), warn=False)
        where = f"step {ckpts[-1]['step']}" if ckpts else "the start (no checkpoint yet)"
        err.print(f"[yellow]interrupted[/yellow]: {spec.name} stopped; submit the same job again to continue "
                  f"from {where}", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    finally:
        display.stop()
    rows = [("run", result.run_url)]
    if result.checkpoints:
        rows.append(("checkpoints", ", ".join(c["name"] for c in result.checkpoints)))
        rows.append(("latest checkpoint", result.checkpoints[-1]["url"]))
    if result.samples:
        rows.append(("sample grids", f"{result.run_url}/samples/ (latest {result.samples[-1].rsplit('/', 1)[-1]})"))
    if result.metrics:
        rows.append(("final metrics", _fmt_metrics(result.metrics)))
    if result.rollbacks:
        rows.append(("divergence rollbacks", f"{len(result.rollbacks)} (learning rates now "
                                             f"x{result.rollbacks[-1]['lr_scale']:g})"))
    if result.skipped_images is None:
        rows.append(("skipped corrupt images", "unknown (the run's monitor was lost with its node)"))
    elif result.skipped_images:
        rows.append(("skipped corrupt images", f"{len(result.skipped_images)} (first: {result.skipped_images[0]})"))
    out.print(f"[bold green]done[/bold green] {spec.name}: {result.steps} steps in {time.monotonic() - t0:.0f} s")
    for key, value in rows:
        out.print(f"  [bold]{key}[/bold]: {value}", highlight=False, soft_wrap=True)


ForceOpt = typer.Option(False, "--force", help="take over the run even if another live process holds its lock")


@app.command()
@command
def submit(job: str, set_: Optional[list[str]] = SetOpt,
           address: Optional[str] = AddressOpt,
           follow: bool = typer.Option(False, "--follow", "-f", help="stream logs until the job ends"),
           paths_on_cluster: bool = OnClusterOpt, force: bool = ForceOpt):
    """Run a job: on an embedded local Ray, or on a cluster through the Jobs API with --address
    (the job travels with every --set applied; datasets never do)."""
    spec = jobspec.load(job, set_)
    address = address or _jobs_address_from_env()
    if address:
        from rayganx import remote

        job_id = remote.submit(spec, address, paths_on_cluster, force)
        out.print(f"submitted {job_id} to {address}", highlight=False)
        if not follow:
            out.print(f"follow it with: rayganx logs {job_id} --follow --address {address}", highlight=False)
            return
        _follow(address, job_id)
        return
    _run_here(spec, force)


def _follow(address: str, job_id: str) -> None:
    from rayganx import remote

    state = remote.follow(address, job_id, lambda chunk: (sys.stdout.write(chunk), sys.stdout.flush()))
    (out if state == "SUCCEEDED" else err).print(f"{job_id}: {state}", highlight=False)
    if state != "SUCCEEDED":
        raise typer.Exit(1)


def _jobs_address_from_env() -> str | None:
    import os

    addr = os.environ.get("RAY_ADDRESS", "")
    return addr if addr.startswith(("http://", "https://")) else None



def _need_address(address: str | None) -> str:
    address = address or _jobs_address_from_env()
    if not address:
        raise jobspec.SpecError("--address: no cluster given (or set RAY_API_SERVER_ADDRESS / RAY_ADDRESS)")
    return address


@app.command()
@command
def status(job_id: Optional[str] = typer.Argument(None, help="submission id (default: the newest rayganx job)"),
           address: Optional[str] = AddressOpt):
    """The state of a job on a cluster."""
    from rayganx import remote

    address = _need_address(address)
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
    from rayganx import remote

    address = _need_address(address)
    if follow:
        _follow(address, job_id)
    else:
        sys.stdout.write(remote.logs(address, job_id))


@app.command()
@command
def stop(job_id: str, address: Optional[str] = AddressOpt):
    """Stop a running job."""
    from rayganx import remote

    address = _need_address(address)
    remote.stop(address, job_id)
    out.print(f"stop requested for {job_id}", highlight=False)


@app.command("list")
@command
def list_cmd(address: Optional[str] = AddressOpt):
    """A table of the rayganx jobs on a cluster."""
    from rayganx import remote

    address = _need_address(address)
    table = Table(title=f"rayganx jobs on {address}")
    for col in ("submission id", "job", "status", "started", "duration"):
        table.add_column(col)
    for j in remote.list_jobs(address):
        start, end = (j.start_time or 0) / 1000, (j.end_time or 0) / 1000
        dur = (end or time.time()) - start if start else 0
        table.add_row(j.submission_id, j.metadata.get("rayganx_job", ""), j.status.value, _when(start),
                      f"{dur:.0f} s")
    out.print(table)


@app.command("run")
@command
def run_cmd(job: str, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt):
    """Run a job in this process on the Ray cluster it is started in (the Jobs API entrypoint)."""
    _run_here(jobspec.load(job, set_), force)


# --------------------------------------------------------------------------- tune


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1] if not key.startswith("train.optim") else key.split(".", 1)[1]


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class _TrialTable:
    """The sweep's trials as a live rich table on a terminal, one line per event elsewhere."""

    def __init__(self, sw):
        from rayganx.tune import _is_distribution

        self.sw, self.rows = sw, {}
        self.keys = [k for k, v in sw.space.items() if _is_distribution(v)] + \
                    [k for k in sw.mutations if k not in sw.space]
        self.live = None
        if out.is_terminal:
            from rich.live import Live

            self.live = Live(self.table(), console=out, refresh_per_second=2)
            self.live.start()

    def table(self) -> Table:
        t = Table(title=f"sweep {self.sw.spec.name}: {self.sw.metric} ({self.sw.mode}), "
                        f"{self.sw.spec.scheduler.kind}, up to {self.sw.max_steps} steps")
        for col in ("trial", "status", "step", self.sw.metric, *map(_short, self.keys)):
            t.add_column(col)
        for name, r in sorted(self.rows.items()):
            t.add_row(name, r["status"], str(r.get("step", "")), _fmt(r.get("metric", "")),
                      *(_fmt(r["config"].get(k, "")) for k in self.keys))
        return t

    def __call__(self, trial: str, status: str, result: dict | None, config: dict):
        row = self.rows.setdefault(trial, {"status": status, "config": config})
        if status == "ended":  # a finished trial or one the scheduler stopped
            status = "finished" if row.get("step", 0) >= self.sw.max_steps else "stopped early"
        row["status"], row["config"] = status, config
        if result:
            row["step"] = result.get("step", row.get("step"))
            if self.sw.metric in result:
                row["metric"] = result[self.sw.metric]
        if self.live:
            self.live.update(self.table())
        else:
            m = f" {self.sw.metric} {_fmt(row['metric'])}" if result and "metric" in row else ""
            hp = " ".join(f"{_short(k)}={_fmt(config.get(k))}" for k in self.keys)
            out.print(f"{trial} {status} step {row.get('step', 0)}{m} | {hp}", highlight=False, soft_wrap=True)

    def stop(self):
        if self.live:
            self.live.stop()


def _print_leaderboard(board: dict) -> None:
    t = Table(title=f"leaderboard: {board['sweep']} by {board['metric']} ({board['mode']})")
    for col in ("rank", "trial", "status", "steps", f"best {board['metric']}", "at step"):
        t.add_column(col)
    for i, r in enumerate(board["trials"], 1):
        t.add_row(str(i), r["trial"], r["status"], str(r["step"]), _fmt(r["best"]) if r["best"] is not None else "-",
                  str(r["best_step"] or "-"))
    out.print(t)
    if board.get("best_job"):
        best = board["trials"][0]
        out.print(f"  [bold]best checkpoint[/bold]: {best['checkpoint']}", highlight=False, soft_wrap=True)
        how = (f"rayganx submit {board['best_job']}" if "://" not in board["best_job"]
               else "copy it here, then rayganx submit best_job.yaml")
        out.print(f"  [bold]best job[/bold]: {board['best_job']} (train it: {how})", highlight=False, soft_wrap=True)
    out.print(f"  [bold]leaderboard[/bold]: {board['root']}/leaderboard.json", highlight=False, soft_wrap=True)


@app.command("tune")
@command
def tune_cmd(sweep: Optional[str] = typer.Argument(None, help="sweep YAML"),
             set_: Optional[list[str]] = typer.Option(None, "--set", help="override a sweep key: key=value"),
             resume: bool = typer.Option(False, "--resume", help="continue an interrupted sweep"),
             defaults: bool = typer.Option(False, "--defaults", help="print the built-in search spaces"),
             address: Optional[str] = AddressOpt,
             follow: bool = typer.Option(False, "--follow", "-f", help="with --address: stream logs until it ends"),
             paths_on_cluster: bool = OnClusterOpt):
    """Run a Ray Tune sweep (ASHA or PBT) over a job's hyperparameters."""
    from rayganx import tune

    if defaults:
        sys.stdout.write(tune.default_spaces_yaml())
        return
    if not sweep:
        raise jobspec.SpecError("tune: give a sweep YAML (or --defaults)")
    sw = tune.load(sweep, set_)
    address = address or _jobs_address_from_env()
    if address:
        from rayganx import remote

        job_id = remote.submit_sweep(sw, address, resume, paths_on_cluster)
        out.print(f"submitted {job_id} to {address}", highlight=False)
        if follow:
            _follow(address, job_id)
        else:
            out.print(f"follow it with: rayganx logs {job_id} --follow --address {address}", highlight=False)
        return
    table = _TrialTable(sw)
    t0 = time.monotonic()
    try:
        board = tune.run(sw, resume=resume, verbose=STATE["verbose"], printer=table)
    finally:
        table.stop()
    if board["unfinished"]:
        _print_leaderboard(board)
        err.print(f"[yellow]interrupted[/yellow]: {len(board['unfinished'])} trial(s) unfinished; continue with "
                  f"rayganx tune {sweep} --resume", highlight=False)
        raise typer.Exit(130)
    out.print(f"[bold green]done[/bold green] sweep {sw.spec.name}: {len(board['trials'])} trials in "
              f"{time.monotonic() - t0:.0f} s")
    _print_leaderboard(board)
    if not board.get("best_job"):
        err.print("[red]error:[/red] no trial reported the metric; see the trials' status above", highlight=False)
        raise typer.Exit(1)


# --------------------------------------------------------------------------- data


@data_app.command("prepare")
@command
def data_prepare(dataset: str = typer.Argument(..., help="built-in dataset: digits"),
                 out_dir: str = typer.Option(..., "--out", help="directory or URL to write"),
                 fmt: str = typer.Option("folder", "--format", help="folder | parquet"),
                 size: int = typer.Option(32, "--size", help="image size in pixels"),
                 endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url")):
    """Write a built-in dataset in the on-disk formats users have."""
    from rayganx.data import DataError, prepare_digits

    if dataset != "digits":
        raise DataError(f"unknown dataset {dataset!r}; built in: digits")
    n = prepare_digits(out_dir, fmt, size, endpoint_url)
    out.print(f"wrote {n} digits images ({fmt}, {size}x{size}) to {out_dir}")


# --------------------------------------------------------------------------- runs and checkpoints


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _run_location(run: str, endpoint_url: str | None) -> tuple[str, str | None]:
    """A run URL, or the run a job file describes."""
    if run.endswith((".yaml", ".yml")):
        from rayganx.runner import resolve_paths

        spec = resolve_paths(jobspec.load(run))
        return spec.run_url, spec.storage.endpoint_url or endpoint_url
    return run, endpoint_url


@runs_app.command("list")
@command
def runs_list(storage: str = typer.Argument(..., help="storage location (path or URL)"),
              endpoint_url: Optional[str] = EndpointOpt):
    """A table of the runs found in a storage location."""
    from rayganx.storage import Store, list_runs

    runs = list_runs(Store(storage, endpoint_url))
    table = Table(title=f"runs in {storage}")
    for col in ("name", "model", "last step", "last update", "latest metrics"):
        table.add_column(col)
    for r in runs:
        table.add_row(r["name"], r["model"], str(r["step"] or "-"), _when(r["time"]), _fmt_metrics(r["metrics"]))
    out.print(table if runs else f"no runs in {storage}")


def _compare_table(views, title: str, diff: list) -> Table:
    from rayganx import compare

    table = Table(title=title)
    table.add_column("")
    for v in views:
        table.add_column(v.label, overflow="fold")
    table.add_row("run", *(v.url for v in views))
    table.add_row("model", *(str(v.spec.get("model", {}).get("kind", "?")) for v in views))
    table.add_row("last step", *(str(v.rows[-1]["step"]) if v.rows else "-" for v in views))
    for key, values in diff:
        table.add_row(key, *map(compare.fmt, values), style="cyan")
    for key in compare.summary_keys(views):
        table.add_row(key, *(compare.metric_cell(v, key) for v in views))
    return table


@runs_app.command("compare")
@command
def runs_compare(runs: list[str] = typer.Argument(..., help="runs (paths or URLs); a sweep's folder stands for its trials"),
                 out_png: str = typer.Option("compare.png", "--out", help="PNG with the curves and last sample grids"),
                 endpoint_url: Optional[str] = EndpointOpt):
    """Runs side by side: the spec keys that differ, latest and best metrics, and a PNG of their
    curves on shared axes with their last sample grids."""
    from rayganx import compare

    views = compare.load_runs(compare.expand([_run_location(r, endpoint_url)[0] for r in runs], endpoint_url))
    if len(views) < 2:
        raise jobspec.SpecError("runs compare: name at least two runs (or a sweep); `rayganx runs show RUN` shows one")
    diff = compare.spec_diff(views)
    out.print(_compare_table(views, f"{len(views)} runs: spec keys that differ (cyan), latest metrics "
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
    from rayganx import compare
    from rayganx.storage import Store

    url, endpoint = _run_location(run, endpoint_url)
    (view,) = compare.load_runs([Store(url, endpoint)])
    out.print(_compare_table([view], f"{view.name}: spec keys set away from the defaults (cyan), latest metrics "
                                     f"(best @ step)", [(k, [v]) for k, v in compare.non_default(view)]))
    if view.checkpoints:
        table = Table(title="checkpoints")
        for col in ("step", "time", "size", "metrics"):
            table.add_column(col)
        for c in view.checkpoints:
            table.add_row(str(c["step"]), _when(c["time"]), _size(c["size"]), _fmt_metrics(c["metrics"]))
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


@ckpt_app.command("list")
@command
def checkpoints_list(run: str = typer.Argument(..., help="run URL, or the job YAML"),
                     endpoint_url: Optional[str] = EndpointOpt):
    """A table of a run's checkpoints."""
    from rayganx.storage import Store, list_checkpoints

    url, endpoint = _run_location(run, endpoint_url)
    ckpts = list_checkpoints(Store(url, endpoint))
    table = Table(title=f"checkpoints of {url}")
    for col in ("step", "time", "size", "metrics", "url"):
        table.add_column(col)
    for c in ckpts:
        table.add_row(str(c["step"]), _when(c["time"]), _size(c["size"]), _fmt_metrics(c["metrics"]), c["url"])
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

    from rayganx.storage import Store, StorageError, download, list_checkpoints

    url, endpoint = _run_location(run, endpoint_url)
    ckpts = list_checkpoints(Store(url, endpoint))
    if not ckpts:
        raise StorageError(f"{url}: no checkpoints")
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
def sample(checkpoint: str = typer.Argument(..., help="checkpoint folder (local or URL) or exported .pt"),
           n: int = typer.Option(64, "--n", help="number of images"),
           seed: int = typer.Option(0, "--seed"),
           out_png: Optional[str] = typer.Option(None, "--out", help="grid PNG to write"),
           out_dir: Optional[str] = typer.Option(None, "--out-dir", help="also write each image here"),
           endpoint_url: Optional[str] = EndpointOpt):
    """Generate images from a checkpoint's generator; no Ray cluster needed."""
    import os

    from rayganx import models
    from rayganx.data import grid_png, png_bytes, to_uint8

    if not out_png and not out_dir:
        raise jobspec.SpecError("--out or --out-dir: say where to write the images")
    g, spec, num_classes = models.open_generator(checkpoint, endpoint_url)
    images, per_row = models.sample_images(g, spec, num_classes, n, seed)
    if out_png:
        with open(out_png, "wb") as f:
            f.write(grid_png(images, per_row))
        out.print(f"wrote a grid of {len(images)} images to {out_png}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for i, im in enumerate(to_uint8(images)):
            with open(os.path.join(out_dir, f"{i:05d}.png"), "wb") as f:
                f.write(png_bytes(im))
        out.print(f"wrote {len(images)} images to {out_dir}")


@app.command("generate")
@command
def generate_cmd(checkpoint: str = typer.Argument(..., help="checkpoint folder (local or URL) or exported .pt"),
                 n: int = typer.Option(..., "--n", help="number of images"),
                 out_url: str = typer.Option(..., "--out", help="folder or URL for the Parquet parts"),
                 labels: Optional[str] = typer.Option(None, "--labels",
                                                      help="classes to generate in turn, e.g. 3,5 (conditional "
                                                           "generators; default: every class)"),
                 seed: int = typer.Option(0, "--seed", help="image i is drawn from seed * 2**32 + i"),
                 workers: int = typer.Option(2, "--workers", help="generator copies working at once"),
                 part_size: int = typer.Option(1000, "--part-size", help="images per Parquet part"),
                 gpu: bool = typer.Option(False, "--gpu", help="one GPU per worker"),
                 address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                                                       help="Ray cluster (what ray.init takes); default: embedded"),
                 endpoint_url: Optional[str] = EndpointOpt):
    """Write N generated images (PNG bytes, label, seed) as Parquet with Ray Data; a re-run makes only the missing parts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from rayganx import generate
    from rayganx.runner import init_ray

    if address and address.startswith("http"):
        raise jobspec.SpecError(f"--address {address}: generate joins a Ray cluster (host:6379 or ray://host:10001), "
                                f"not the Jobs API")
    try:
        classes = tuple(int(v) for v in labels.split(",") if v.strip()) if labels is not None else None
    except ValueError:
        raise jobspec.SpecError(f"--labels {labels!r}: expected a comma list of class numbers") from None
    plan = generate.Plan(checkpoint, n, seed, classes, part_size)
    todo = generate.prepare(plan, out_url, endpoint_url)  # a bad plan fails here, before Ray starts
    init_ray(address=address)
    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=out,
                  disable=not out.is_terminal) as bar:
        task = bar.add_task("generating", total=n)
        result = generate.run(plan, todo, out_url, endpoint_url, workers=workers, use_gpu=gpu,
                              on_part=lambda done, total: bar.update(task, completed=done))
    out.print(f"{result['images']} images in {result['parts']} parts at {result['out']} "
              f"({result['written']} written now, {result['skipped']} already there)", soft_wrap=True)


@app.command()
@command
def export(checkpoint: str = typer.Argument(..., help="checkpoint folder (local or URL)"),
           out_path: str = typer.Option(..., "--out", help="file to write, e.g. generator.pt"),
           program: bool = typer.Option(True, "--pt2/--no-pt2",
                                        help="also write OUT's stem + .pt2, a torch.export program that needs torch alone"),
           endpoint_url: Optional[str] = EndpointOpt):
    """Write the generator: weights + architecture (rayganx.models) and a torch.export program (torch alone)."""
    import os

    from rayganx import models
    from rayganx.storage import load_state

    pt2 = os.path.splitext(out_path)[0] + ".pt2" if program else None
    models.export_generator(load_state(checkpoint, endpoint_url), out_path, pt2)
    out.print(f"wrote {out_path}: load it with rayganx.models.load_generator({out_path!r})")
    if pt2:
        out.print(f"wrote {pt2}: torch.export.load({pt2!r}).module() maps latent vectors to images")


@app.command("eval")
@command
def eval_cmd(checkpoint: str = typer.Argument(..., help="checkpoint folder (local or URL)"),
             metrics: Optional[str] = typer.Option(
                 None, "--metrics", help="comma list of fid, kid, is, pr, cas (images; default fid,kid) or modes, "
                                         "hq, kl (2-D mixtures, their default)"),
             num_samples: Optional[int] = typer.Option(
                 None, "--num-samples", help="default 1000; for 2-D mixtures 2500 per set (the papers' protocol)"),
             sample_sets: int = typer.Option(5, "--sample-sets", help="2-D mixtures: sets the mode metrics average over"),
             features: Optional[str] = typer.Option(None, "--features",
                                                    help="random | classifier | torchscript | inception"),
             extractor: Optional[str] = typer.Option(None, "--extractor", help="classifier checkpoint or .pt file"),
             extractor_sha256: Optional[str] = typer.Option(None, "--extractor-sha256",
                                                            help="--features torchscript: the file's SHA-256"),
             inception_path: Optional[str] = typer.Option(
                 None, "--inception-path", help="--features inception: the FID Inception weights file (else fetched "
                                                "once into the cache)"),
             seed: int = typer.Option(0, "--seed"),
             cas_steps: int = typer.Option(400, "--cas-steps", min=1,
                                           help="cas: steps of each classifier (jobs/cnn_digits.yaml's recipe: 400)"),
             json_out: Optional[str] = typer.Option(None, "--json", help="also write the results here"),
             endpoint_url: Optional[str] = EndpointOpt):
    """Score a checkpoint's generator against its job's data (FID, KID, IS, precision/recall, and for
    conditional generators the Classification Accuracy Score; for 2-D mixtures the modes covered, the
    share of high-quality samples and the KL of their mode histogram)."""
    import json

    from rayganx import models
    from rayganx.metrics import evaluate_generator
    from rayganx.storage import load_state

    state = load_state(checkpoint, endpoint_url)
    g, spec, num_classes = models.generator_from_state(state)
    points = spec.data.source == "gaussian_mixture"
    metrics = metrics or ("modes,hq,kl" if points else "fid,kid")
    num_samples = num_samples or (2500 if points else 1000)
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    ev = {"metrics": names, "num_samples": num_samples, "sample_sets": sample_sets}
    ev |= {"features": features} if features else {}
    ev |= {"extractor": extractor} if extractor else {}
    ev |= {"extractor_sha256": extractor_sha256} if extractor_sha256 else {}
    ev |= {"inception_path": inception_path} if inception_path else {}
    spec = jobspec.from_dict(spec.to_dict() | {"eval": spec.eval.model_dump() | ev}, source=checkpoint)
    problems = jobspec.metric_problems(spec)
    if problems:
        raise jobspec.SpecError(f"--metrics: {problems[0].split(': ', 1)[1]}")
    if endpoint_url and not spec.storage.endpoint_url:
        spec.storage.endpoint_url = endpoint_url
    if endpoint_url and not spec.data.endpoint_url:
        spec.data.endpoint_url = endpoint_url
    if "cas" in names:
        from rayganx.metrics import check_cas

        check_cas(spec, num_classes)  # one line, before Ray or any feature extraction starts
        if spec.is_gan and not spec.data.per_class:
            _warn("cas: this generator trained on every image, the held-out ones the score tests on included "
                  "(GAN jobs read data.val_fraction's split only with data.per_class); the score is optimistic")
    results = evaluate_generator(g, spec, num_classes, names, num_samples, seed, verbose=STATE["verbose"],
                                 cas_steps=cas_steps)
    what = f"{sample_sets} sets of {num_samples} samples" if points else f"{num_samples} samples, {spec.eval.features} features"
    table = Table(title=f"{checkpoint} (step {state.get('step')}, {what})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        table.add_row(k, f"{v:.4f}")
    out.print(table)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"checkpoint": checkpoint, "step": state.get("step"), "num_samples": num_samples,
                       "features": spec.eval.features, **results}, f, indent=2)


def _is_sweep(path: str) -> bool:
    raw = jobspec.load_yaml(path)
    return "job" in raw and "model" not in raw


def _core_schema_note() -> None:
    from rayganx import k8s

    if not k8s.core_schema_available():
        err.print("[yellow]note:[/yellow] pod templates not checked against the Kubernetes core schema "
                  "(pip install 'rayganx[k8s]')", highlight=False)


CrdsOpt = typer.Option(None, "--crds", help="directory with the KubeRay RayJob/RayCluster CRDs (default: "
                                             "RAYGANX_KUBERAY_CRDS, the current kube context's cluster, the cache)")


@k8s_app.command("render")
@command
def k8s_render(job: str = typer.Argument(..., help="job or sweep YAML"),
               image: str = typer.Option(..., "--image", help="container image with rayganx"),
               namespace: str = typer.Option("default", "--namespace"),
               gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker",
                                                               help="GPU workers: same as --set scaling.use_gpu=true "
                                                                    "--set scaling.gpus_per_worker=N"),
               secret: str = typer.Option("rayganx-storage", "--secret", help="Secret with storage credentials"),
               pvc: Optional[str] = typer.Option(None, "--pvc", help="CLAIM:/mount: a PersistentVolumeClaim mounted "
                                                                     "in every pod; local paths under it are allowed"),
               crds: Optional[str] = CrdsOpt,
               out_file: Optional[str] = typer.Option(None, "--out", help="write here instead of stdout"),
               set_: Optional[list[str]] = SetOpt):
    """A ConfigMap + RayJob manifest for a job or a sweep: the ConfigMap holds the job as it will run
    (every --set applied), the cluster is sized from it. Checked against the CRDs when found."""
    from rayganx import crds as kcrds
    from rayganx import k8s

    volume = k8s.parse_pvc(pvc) if pvc else None
    gpu_sets = [] if gpus_per_worker is None else (
        ["scaling.use_gpu=true", f"scaling.gpus_per_worker={gpus_per_worker!r}"] if gpus_per_worker > 0
        else ["scaling.use_gpu=false"])
    if _is_sweep(job):
        from rayganx import tune

        docs = k8s.render_sweep(tune.load(job, set_), image, namespace, secret, volume, gpu_sets)
    else:
        docs = k8s.render(jobspec.load(job, [*(set_ or []), *gpu_sets]), image, namespace, secret, volume)
    try:
        schemas = kcrds.find(crds)
    except kcrds.SchemasMissing:
        schemas = None
    problems = [p for d in docs for p in k8s.validate_doc(d, "rendered manifest", schemas)]
    if problems:
        raise k8s.ManifestError("\n".join(problems))
    _emit(k8s.dump(docs), out_file)
    if schemas is None:
        err.print("[yellow]note:[/yellow] not checked against the KubeRay CRD schemas (none found; "
                  "see rayganx k8s validate --help)", highlight=False)
    _core_schema_note()


@k8s_app.command("validate")
@command
def k8s_validate(files: list[str] = typer.Argument(..., help="manifest files"),
                 crds: Optional[str] = CrdsOpt,
                 server: bool = typer.Option(False, "--server", help="also let the API server of the current kube "
                                                                     "context validate them (kubectl apply "
                                                                     "--dry-run=server)")):
    """Validate manifests: KubeRay CRD schemas and controller rules, pod templates against Kubernetes.
    Exit 1: invalid; exit 3: no CRD schemas found (and how to get them)."""
    from rayganx import crds as kcrds
    from rayganx import k8s

    try:
        schemas = kcrds.find(crds)
    except kcrds.SchemasMissing:
        if not server:
            raise
        schemas = None
    problems = [p for f in files for p in k8s.validate_file(f, schemas)]
    if server:
        problems += [p for f in files for p in kcrds.server_dry_run(f)]
    if problems:
        raise k8s.ManifestError("\n".join(problems))
    checks = ([f"KubeRay CRDs from {schemas.source}"] if schemas else []) + (["the API server"] if server else [])
    out.print(f"{len(files)} manifest file(s) valid ({', '.join(checks)})", highlight=False, soft_wrap=True)
    _core_schema_note()


@k8s_app.command("crds")
@command
def k8s_crds(sources: list[str] = typer.Option(..., "--from", help="file, directory or URL holding the KubeRay "
                                                                   "CRDs (repeatable)")):
    """Cache the KubeRay RayJob/RayCluster CRDs for `k8s validate` (per user)."""
    from rayganx import crds as kcrds

    dest, kinds = kcrds.fetch(sources)
    out.print(f"cached the {' and '.join(kinds)} CRDs in {dest}", highlight=False, soft_wrap=True)
    missing = sorted(set(kcrds.CRD_NAMES.values()) - set(kinds))
    if missing and not all((dest / f"ray.io_{k.lower()}s.yaml").is_file() for k in missing):
        err.print(f"[yellow]note:[/yellow] still missing: {', '.join(missing)} (add it with --from)", highlight=False)


# --------------------------------------------------------------------------- monitoring


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
    from rayganx import monitor

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
    from rayganx import grafana

    _emit(grafana.to_json(), out_file)


# --------------------------------------------------------------------------- bench


@app.command()
@command
def bench(job: str, set_: Optional[list[str]] = SetOpt,
          steps: int = typer.Option(100, "--steps", help="timed steps per row"),
          warmup: int = typer.Option(20, "--warmup", help="steps excluded from timing"),
          workers: str = typer.Option("1", "--workers", help="worker counts, e.g. 1,2"),
          json_out: Optional[str] = typer.Option(None, "--json", help="write the results here")):
    """Measure the job through rayganx against a plain PyTorch loop, side by side."""
    import json

    from rayganx.bench import bench as run_bench

    spec = jobspec.load(job, set_)
    counts = [int(w) for w in workers.split(",") if w.strip()]
    res = run_bench(spec, steps=steps, warmup=warmup, workers=counts)
    p = res["plain"]
    table = Table(title=f"{res['job']}: {res['model']} {res['image_size']} px, batch {res['per_worker_batch']}"
                        f"/worker, {steps} steps after {warmup} warm-up"
                        + (" (stand-in images)" if res["stand_in_data"] else ""))
    for col in ("row", "images/s", "step ms median (min-max)", "vs plain", "scaling", "first step",
                "peak RSS/worker", "FLOP util"):
        table.add_column(col, justify="right")

    def ms(st):
        return f"{st['median'] * 1e3:.1f} ({st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f})"

    table.add_row("plain PyTorch", f"{p['images_per_s']:.0f}", ms(p["step_time"]), "1.00", "-", "-", "-",
                  f"{p['flop_utilisation']:.1%}")
    for r in res["rayganx"]:
        table.add_row(f"rayganx {r['workers']} worker(s)", f"{r['images_per_s']:.0f}", ms(r["step_time"]),
                      f"{r['ratio_to_plain']:.2f}", f"{r['scaling_efficiency']:.2f}",
                      f"{r['time_to_first_step']:.1f} s (+{r['startup_over_bare_s']:.1f})",
                      f"{r['peak_rss_mb_per_worker']:.0f} MB", f"{r['flop_utilisation']:.1%}")
    i = res["input_only"]
    table.add_row("input only (Ray Data)", f"{i['images_per_s']:.0f}", "-",
                  f"{i['multiple_of_consumption']:.1f}x need", "-", "-", "-", "-")
    out.print(table)
    out.print(f"bare TorchTrainer start-up {res['bare_trainer_startup_s']:.1f} s; matmul peak "
              f"{res['machine']['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s on {res['machine']['threads_per_worker']} "
              f"thread(s); whole command {res['command_s']:.0f} s")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=2)
        out.print(f"wrote {json_out}")


def main():
    app()


if __name__ == "__main__":
    main()
