"""`rayganx tune`: run a sweep here or on a cluster, with its live trial table."""

from __future__ import annotations

import sys
import time
from typing import Optional

import typer

from rayganx.job import spec as jobspec
from rayganx.cli.base import AddressOpt, OnClusterOpt, STATE, app, command, err, out
from rayganx.cli.display import TrialTable, print_leaderboard
from rayganx.cli.jobs import follow_job, jobs_address_from_env


@app.command("tune")
@command
def tune_cmd(sweep: Optional[str] = typer.Argument(None, help="sweep YAML"),
             set_: Optional[list[str]] = typer.Option(None, "--set", help="override a sweep key: key=value"),
             resume: bool = typer.Option(False, "--resume", help="continue an interrupted sweep"),
             trust_sweep_state: bool = typer.Option(
                 False, "--trust-sweep-state",
                 help="with --resume of a sweep on object storage: load Tune's state from there (Tune unpickles "
                      "it: anyone who can write the sweep folder could run code here)"),
             defaults: bool = typer.Option(False, "--defaults", help="print the built-in search spaces"),
             address: Optional[str] = AddressOpt,
             follow: bool = typer.Option(False, "--follow", "-f", help="with --address: stream logs until it ends"),
             paths_on_cluster: bool = OnClusterOpt):
    """Run a Ray Tune sweep (ASHA or PBT) over a job's hyperparameters."""
    from rayganx.sweeps import sweep as sweeps
    from rayganx.sweeps import tune

    if defaults:
        sys.stdout.write(sweeps.default_spaces_yaml())
        return
    if not sweep:
        raise jobspec.SpecError("tune: give a sweep YAML (or --defaults)")
    sw = sweeps.load(sweep, set_)
    address = address or jobs_address_from_env()
    if address:
        from rayganx.ops import remote

        job_id = remote.submit_sweep(sw, address, resume, paths_on_cluster, trust_sweep_state)
        out.print(f"submitted {job_id} to {address}", highlight=False)
        if follow:
            follow_job(address, job_id)
        else:
            out.print(f"follow it with: rayganx logs {job_id} --follow --address {address}", highlight=False)
        return
    table = TrialTable(sw)
    t0 = time.monotonic()
    try:
        board = tune.run(sw, resume=resume, verbose=STATE["verbose"], printer=table, trust_state=trust_sweep_state)
    finally:
        table.stop()
    if board["unfinished"]:
        print_leaderboard(board)
        err.print(f"[yellow]interrupted[/yellow]: {len(board['unfinished'])} trial(s) unfinished; continue with "
                  f"rayganx tune {sweep} --resume", highlight=False)
        raise typer.Exit(130)
    out.print(f"[bold green]done[/bold green] sweep {sw.spec.name}: {len(board['trials'])} trials in "
              f"{time.monotonic() - t0:.0f} s")
    print_leaderboard(board)
    failed = [r["trial"] for r in board["trials"] if r["status"].startswith("error")]
    if failed:
        err.print(f"[red]error:[/red] {len(failed)} of {len(board['trials'])} trial(s) failed ({', '.join(failed)}: "
                  f"see their status above); rayganx tune {sweep} --resume runs them again", highlight=False)
        raise typer.Exit(1)
    if not board.get("best_job"):
        err.print("[red]error:[/red] no trial reported the metric; see the trials' status above", highlight=False)
        raise typer.Exit(1)
