"""`rayganx ...` in a new process forked from one that imported torch already.

Each CLI call as `python -m rayganx.cli` pays Python's start and torch's import (1.5-2 s here)
before it reads an argument, and most of the suite's ~100 calls fail on bad input or finish in well
under a second after that. Python's forkserver (multiprocessing) imports torch and a few
third-party modules once; every call is a fork of it: its own process, environment, working
directory, stdout and stderr (pipes at the descriptor level, read to their end as
`subprocess.run` does, so Ray's and C libraries' output lands there too and a process left holding
them shows as a timeout), exit status, thread shutdown and atexit handlers (an embedded Ray shuts
down as in a real exit).

Preloaded are only modules that take no settings from the environment at import, or whose
settings no test changes per call (torch reads its thread counts at import). rayganx itself, fsspec
(FSSPEC_*, HOME) and Ray (RAY_*) are imported by each call after its environment is set, and the
CLI's consoles see that call's pipes. The console script installed from a wheel is tested as a real
executable in test_install.
"""

from __future__ import annotations

import atexit
import locale
import multiprocessing
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy  # noqa: F401
import pydantic  # noqa: F401
import rich.console  # noqa: F401
import torch  # noqa: F401
import typer  # noqa: F401
import yaml  # noqa: F401

_forkserver = multiprocessing.get_context("forkserver")
_forkserver.set_forkserver_preload([__name__])


def _main(args: list[str], env: dict, cwd: str, out, err) -> None:
    for fd, conn in ((1, out), (2, err)):
        os.dup2(conn.fileno(), fd)
        conn.close()
    code = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = ["rayganx", *args]
        import rayganx.cli

        rayganx.cli.main()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # as the interpreter ends: killed by the signal
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # what the interpreter does at exit, in its order
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def run(args: list[str], env: dict, cwd, timeout: float | None) -> subprocess.CompletedProcess:
    if not os.path.isdir(cwd):
        raise FileNotFoundError(cwd)
    cmd = ["rayganx", *args]
    (r_out, w_out), (r_err, w_err) = (_forkserver.Pipe(duplex=False) for _ in range(2))
    p = _forkserver.Process(target=_main, args=(args, env, str(cwd), w_out, w_err))
    p.start()
    w_out.close()
    w_err.close()
    deadline = None if timeout is None else time.monotonic() + timeout
    chunks = {r_out.fileno(): [], r_err.fileno(): []}
    with selectors.DefaultSelector() as sel:
        for conn in (r_out, r_err):
            sel.register(conn.fileno(), selectors.EVENT_READ)
        while sel.get_map():
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                break
            for key, _ in sel.select(wait):
                data = os.read(key.fd, 1 << 16)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
        timed_out = bool(sel.get_map())
    p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    timed_out = timed_out or p.exitcode is None
    if p.exitcode is None:
        p.kill()
        p.join()
    # as subprocess.run(text=True) reads them: the locale's encoding, universal newlines
    stdout, stderr = (b"".join(chunks[c.fileno()]).decode(locale.getpreferredencoding(False))
                      .replace("\r\n", "\n").replace("\r", "\n") for c in (r_out, r_err))
    r_out.close()
    r_err.close()
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    return subprocess.CompletedProcess(cmd, p.exitcode, stdout, stderr)
