"""How commands show things: live run progress, the sweep's trial table, the leaderboard, tables
of runs; formatting only, no work."""

from __future__ import annotations

import time

from rich.table import Table

from rayganx.cli.base import err, out


def fmt_metrics(m: dict) -> str:
    keys = ("loss_d", "loss_g", "loss", "accuracy", "val_accuracy", "elbo", "fid", "kid", "cas",
            "synthetic_share")
    parts = [f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float))]
    if "images_per_s" in m:
        parts.append(f"{m['images_per_s']:.0f} img/s")
    return " | ".join(parts)


class RunDisplay:
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
            self.progress.update(self.task, completed=m["step"], metrics=fmt_metrics(m))
        else:
            out.print(f"step {m['step']}/{self.total} | {fmt_metrics(m)}", highlight=False, soft_wrap=True)

    def stop(self):
        if self.progress:
            self.progress.stop()


def short_key(key: str) -> str:
    return key.rsplit(".", 1)[-1] if not key.startswith("train.optim") else key.split(".", 1)[1]


def fmt_value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class TrialTable:
    """The sweep's trials as a live rich table on a terminal, one line per event elsewhere."""

    def __init__(self, sw):
        from rayganx.sweeps.sweep import is_distribution

        self.sw, self.rows = sw, {}
        self.keys = [k for k, v in sw.space.items() if is_distribution(v)] + \
                    [k for k in sw.mutations if k not in sw.space]
        self.live = None
        if out.is_terminal:
            from rich.live import Live

            self.live = Live(self.table(), console=out, refresh_per_second=2)
            self.live.start()

    def table(self) -> Table:
        t = Table(title=f"sweep {self.sw.spec.name}: {self.sw.metric} ({self.sw.mode}), "
                        f"{self.sw.spec.scheduler.kind}, up to {self.sw.max_steps} steps")
        for col in ("trial", "status", "step", self.sw.metric, *map(short_key, self.keys)):
            t.add_column(col)
        for name, r in sorted(self.rows.items()):
            t.add_row(name, r["status"], str(r.get("step", "")), fmt_value(r.get("metric", "")),
                      *(fmt_value(r["config"].get(k, "")) for k in self.keys))
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
            m = f" {self.sw.metric} {fmt_value(row['metric'])}" if result and "metric" in row else ""
            hp = " ".join(f"{short_key(k)}={fmt_value(config.get(k))}" for k in self.keys)
            out.print(f"{trial} {status} step {row.get('step', 0)}{m} | {hp}", highlight=False, soft_wrap=True)

    def stop(self):
        if self.live:
            self.live.stop()


def print_leaderboard(board: dict) -> None:
    t = Table(title=f"leaderboard: {board['sweep']} by {board['metric']} ({board['mode']})")
    for col in ("rank", "trial", "status", "steps", f"best {board['metric']}", "at step"):
        t.add_column(col)
    for i, r in enumerate(board["trials"], 1):
        t.add_row(str(i), r["trial"], r["status"], str(r["step"]), fmt_value(r["best"]) if r["best"] is not None else "-",
                  str(r["best_step"] or "-"))
    out.print(t)
    if board.get("best_job"):
        best = board["trials"][0]
        out.print(f"  [bold]best checkpoint[/bold]: {best['checkpoint']}", highlight=False, soft_wrap=True)
        how = (f"rayganx submit {board['best_job']}" if "://" not in board["best_job"]
               else "copy it here, then rayganx submit best_job.yaml")
        out.print(f"  [bold]best job[/bold]: {board['best_job']} (train it: {how})", highlight=False, soft_wrap=True)
    out.print(f"  [bold]leaderboard[/bold]: {board['root']}/leaderboard.json", highlight=False, soft_wrap=True)


def when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def compare_table(views, title: str, diff: list) -> Table:
    from rayganx.ops import compare

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


def print_run_summary(name: str, result, seconds: float) -> None:
    """What a finished run left, and where: checkpoints, samples, final metrics, rollbacks, skipped files."""
    rows = [("run", result.run_url)]
    if result.checkpoints:
        rows.append(("checkpoints", ", ".join(c["name"] for c in result.checkpoints)))
        rows.append(("latest checkpoint", result.checkpoints[-1]["url"]))
    if result.samples:
        rows.append(("sample grids", f"{result.run_url}/samples/ (latest {result.samples[-1].rsplit('/', 1)[-1]})"))
    if result.metrics:
        rows.append(("final metrics", fmt_metrics(result.metrics)))
    if result.rollbacks:
        rows.append(("divergence rollbacks", f"{len(result.rollbacks)} (learning rates now "
                                             f"x{result.rollbacks[-1]['lr_scale']:g})"))
    if result.skipped_images is None:
        rows.append(("skipped corrupt images", "unknown (the run's monitor was lost with its node)"))
    elif result.skipped_images:
        rows.append(("skipped corrupt images", f"{len(result.skipped_images)} (first: {result.skipped_images[0]})"))
    out.print(f"[bold green]done[/bold green] {name}: {result.steps} steps in {seconds:.0f} s")
    for key, value in rows:
        out.print(f"  [bold]{key}[/bold]: {value}", highlight=False, soft_wrap=True)
