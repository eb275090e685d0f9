"""`rayganx ...` in a new process forked from one that imported torch already.

Each CLI call as `python -m rayganx.cli` pays Python's start and torch's import (1.5-2 s here)
before it reads an argument, and most of the suite's ~100 calls fail on bad input or finish in well
under a second after that. Python's forkserver (multiprocessing) imports torch and the CLI's
modules once; every call is a fork of it: its own process, environment, working directory, stdout
and stderr (files at the descriptor level, so Ray's and C libraries' output lands there too), exit
status and atexit handlers (an embedded Ray shuts down as in a real exit).

Preloaded are only modules that read no settings from the environment at import: Ray reads its
settings (RAY_*) when imported, so each call imports Ray itself, after its environment is set.
The console script as installed from a wheel is tested as a real executable in test_install.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback

import torch  # noqa: F401  (the point of the preload)

import rayganx.cli

_forkserver = multiprocessing.get_context("forkserver")
_forkserver.set_forkserver_preload([__name__])


def _main(args: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = ["rayganx", *args]
    code = 0
    try:
        rayganx.cli.main()
    except SystemExit as e:
        code = e.code
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def run(args: list[str], env: dict, cwd: str, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="rgx_cli_") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out, err):
            open(path, "w").close()
        p = _forkserver.Process(target=_main, args=(args, env, str(cwd), out, err))
        p.start()
        p.join(timeout)
        timed_out = p.exitcode is None
        if timed_out:
            p.kill()
            p.join()
        with open(out) as f_out, open(err) as f_err:
            stdout, stderr = f_out.read(), f_err.read()
    cmd = ["rayganx", *args]
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    return subprocess.CompletedProcess(cmd, p.exitcode, stdout, stderr)
