"""The `rayganx` command line: thin commands over the package's core, one module per group.

Each command parses its options, calls one function of the core and prints what it returns
(display helpers in `display`); a user error ends as one red line (`base.command`).

May import: every subpackage.
"""

# Importing a group registers its commands; the order is the order of `rayganx --help`.
from rayganx.cli import base, jobs, sweeps, runs, generators, cluster  # noqa: F401,I001
from rayganx.cli.base import app


def main():
    import faulthandler
    import signal

    # `kill -USR1 <pid>` prints every thread's stack to stderr: what a run that seems stuck waits on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    app()
