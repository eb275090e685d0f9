"""The command line's shared parts: the Typer apps, the consoles, common options, and the
decorator that turns a user error into one red line."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from rayganx import __version__
from rayganx.job.errors import UserError

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


ForceOpt = typer.Option(False, "--force", help="take over the run even if another live process holds its lock")


AllowChangesOpt = typer.Option(False, "--allow-changes",
                               help="continue a stored run even though the job's spec changed in ways continuing "
                                    "cannot honour (a new learning rate, model, data ...)")


CrdsOpt = typer.Option(None, "--crds", help="directory with the KubeRay RayJob/RayCluster CRDs (default: "
                                             "RAYGANX_KUBERAY_CRDS, the current kube context's cluster, the cache)")


def command(fn):
    """Known failures end as one red line and exit 1; --verbose adds the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UserError as e:
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
            warn(record.getMessage())

    pkg = logging.getLogger("rayganx")
    if not pkg.handlers:
        pkg.addHandler(_ToConsole(logging.WARNING))
        pkg.propagate = False
    route_library_warnings()


def route_library_warnings() -> None:
    """Python warnings from the libraries underneath (torchmetrics, torch, Ray, ...) speak of their
    internals, not of the user's job: shown dimmed with --verbose, dropped otherwise. rayganx's
    own warnings stay one yellow line."""
    import os
    import warnings

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # rayganx/

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package):
            warn(str(message))
        elif STATE["verbose"]:
            err.print(f"{category.__name__} ({filename}:{lineno}): {message}", style="dim", markup=False,
                      highlight=False, soft_wrap=True)

    warnings.showwarning = show


def warn(text: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {text}", highlight=False, soft_wrap=True)


def emit(text: str, out_file: str | None) -> None:
    """A command's document: to --out when given, else to stdout (for pipes)."""
    if out_file:
        with open(out_file, "w") as f:
            f.write(text)
        out.print(f"wrote {out_file}")
    else:
        sys.stdout.write(text)
