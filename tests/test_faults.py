"""Runs that survive faults: unsafe files, cut-off checkpoints, a second writer, secrets, and
real faults injected into real runs (a killed worker, Ctrl-C, a store outage, divergence)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from rayganx import runner, spec as jobspec
from rayganx.runs import (MARKER, MetricsLog, RunLock, RunLockedError, checkpoint_manifest, list_checkpoints,
                          load_state, read_metrics, scan_checkpoints)
from rayganx.storage import Store, StorageError
from tests.conftest import JOBS, ROOT, TEST_KEY_ID, TEST_SECRET, local_checkpoint, rayganx, tiny, write_job


def _checkpoint(run: Path, step: int, spec) -> Path:
    """A real checkpoint folder as the train loop writes it (without Ray), marker last."""
    from rayganx.tasks import GANTask

    torch.manual_seed(step)
    task = GANTask(spec, None, torch.device("cpu"), distributed=False)
    return local_checkpoint(run / f"checkpoint_{step:06d}", task, step)


@pytest.fixture
def small_run(tmp_path):
    spec = jobspec.load(JOBS / "dcgan_digits.yaml", ["model.ngf=4", "model.ndf=4", f"storage.path={tmp_path}"])
    run = tmp_path / spec.name
    for step in (2, 4):
        _checkpoint(run, step, spec)
    return run, spec


def test_truncated_newest_checkpoint_is_ignored_by_list_pull_and_sample(small_run, tmp_path):
    run, _ = small_run
    state = run / "checkpoint_000004" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # cut off mid-upload
    complete, incomplete = scan_checkpoints(Store(str(run)))
    assert [c["step"] for c in complete] == [2]
    assert incomplete[0]["name"] == "checkpoint_000004" and "bytes, the marker says" in incomplete[0]["reason"]

    r = rayganx("checkpoints", "list", run)
    assert r.returncode == 0 and "checkpoint_000002" in r.stdout and "checkpoint_000004" not in r.stdout
    assert "warning: ignoring incomplete checkpoint" in r.stderr and "checkpoint_000004" in r.stderr
    r = rayganx("checkpoints", "pull", run, "--latest", "--to", tmp_path / "pulled")
    assert r.returncode == 0 and "pulled step 2" in r.stdout, r.stderr
    r = rayganx("sample", run / "checkpoint_000004", "--out", tmp_path / "x.png")
    assert r.returncode == 1 and "incomplete checkpoint: state.pt has" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    # a folder with no marker at all (the process died before the upload ended)
    (run / "checkpoint_000002" / MARKER).unlink()
    r = rayganx("checkpoints", "list", run)
    assert "no checkpoints" in r.stdout and "no completion marker" in r.stderr


class _RunsCode:
    """A pickle payload that creates a file when unpickled: what a hostile state.pt would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(small_run, tmp_path):
    run, _ = small_run
    side_effect = tmp_path / "pwned"
    d = run / "checkpoint_000004"
    state = torch.load(d / "state.pt", weights_only=True)
    state["models"]["g"]["payload"] = _RunsCode(str(side_effect))
    torch.save(state, d / "state.pt")
    (d / MARKER).write_text(json.dumps(checkpoint_manifest(str(d), 4)))  # even with a valid marker

    with pytest.raises(StorageError, match="refused: the file holds objects other than tensors"):
        load_state(str(d))
    for args in (("sample", d, "--out", tmp_path / "x.png"), ("export", d, "--out", tmp_path / "g.pt"),
                 ("eval", d)):
        r = rayganx(*args)
        assert r.returncode == 1 and "refused" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    evil_export = tmp_path / "generator.pt"
    torch.save({"format": "rayganx-generator/1", "x": _RunsCode(str(side_effect))}, evil_export)
    r = rayganx("sample", evil_export, "--out", tmp_path / "y.png")
    assert r.returncode == 1 and "refused" in r.stderr
    assert not side_effect.exists()


def test_export_loads_with_torch_alone(small_run, tmp_path):
    run, spec = small_run
    r = rayganx("export", run / "checkpoint_000004", "--out", tmp_path / "generator.pt")
    assert r.returncode == 0, r.stderr
    code = (f"import torch, sys; g = torch.export.load(sys.argv[1]).module(); x = g(torch.randn(3, {spec.model.latent_dim})); "
            "print(tuple(x.shape), float(x.abs().max()) <= 1, 'rayganx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "generator.pt2")],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0 and out.stdout.strip() == "(3, 1, 32, 32) True False", out.stderr
    from rayganx import models

    g, _, _ = models.load_generator(str(tmp_path / "generator.pt"))
    z = torch.randn(2, spec.model.latent_dim)
    assert torch.allclose(torch.export.load(str(tmp_path / "generator.pt2")).module()(z), g(z), atol=1e-5)


def test_metrics_log_appends_parts_and_the_reader_survives_torn_lines(tmp_path):
    run = Store(str(tmp_path / "run"))
    log = MetricsLog(run, 0, flush_every_s=3600)
    for step in (2, 4):
        log.append({"step": step, "loss": step})
    log.append({"step": 6, "loss": 6}, force=True)  # a checkpoint step flushes
    log.append({"step": 8, "loss": 8})  # never flushed: the process dies here
    assert [m["step"] for m in read_metrics(run)] == [2, 4, 6]
    parts = sorted((tmp_path / "run" / "metrics").iterdir())
    assert [p.name for p in parts] == ["part_000000.jsonl"]
    # an attempt resumed from the checkpoint at step 4 supersedes what came after it
    resumed = MetricsLog(run, 4, flush_every_s=3600)
    resumed.append({"step": 6, "loss": 60}, force=True)
    assert [(m["step"], m["loss"]) for m in read_metrics(run)] == [(2, 2), (4, 4), (6, 60)]
    with open(parts[0], "a") as f:
        f.write('{"step": 7, "lo')  # a torn line (written by something else, or a bad disk)
    assert [m["step"] for m in read_metrics(run)] == [2, 4, 6]
    assert read_metrics(run, last_only=True)[0]["loss"] == 60


def test_local_checkpoint_copies_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    from rayganx.checkpointing import CKPT_PREFIX, sweep_stale_copies

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f"{CKPT_PREFIX}{dead.stdout.strip()}_abc"
    live = tmp_path / f"{CKPT_PREFIX}{os.getpid()}_def"
    other = tmp_path / "something_else"
    for d in (stale, live, other):
        d.mkdir()
        (d / "state.pt").write_bytes(b"x" * 10)
    assert sweep_stale_copies(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


def test_run_lock_refuses_a_second_writer_and_takes_over_a_stale_one(tmp_path):
    run = Store(str(tmp_path / "run"))
    first = RunLock(run, heartbeat_s=0.2, stale_after=2)
    assert first.acquire() is None
    with pytest.raises(RunLockedError, match=r"in use by .*@.* \(pid \d+\), last heartbeat \d+ s ago; .*--force"):
        RunLock(run).acquire()
    time.sleep(1.0)
    held = json.loads((tmp_path / "run" / "lock.json").read_text())
    assert held["pid"] == os.getpid() and time.time() - held["heartbeat"] < 1.0  # the heartbeat runs
    forced = RunLock(run)
    assert "(--force)" in forced.acquire(force=True)
    first.release()  # no longer the holder: leaves the new holder's lock alone
    assert json.loads((tmp_path / "run" / "lock.json").read_text())["token"] == forced.token
    forced._stop.set()  # the process "dies": no more heartbeats, no release
    stale = RunLock(run, stale_after=0.5)
    time.sleep(0.6)
    assert "no heartbeat for" in stale.acquire()
    stale.release()
    assert not (tmp_path / "run" / "lock.json").exists()


def test_credentials_in_a_job_file_are_refused_and_placeholders_stay_placeholders(tmp_path):
    job = write_job(tmp_path / "j.yaml", "dcgan_digits.yaml",
                    storage={"path": "s3://b/${AWS_SECRET_ACCESS_KEY}"})
    for cmd in ("validate", "submit"):
        r = rayganx(cmd, job)
        assert r.returncode == 1 and "looks like a credential" in r.stderr, r.stderr
        assert TEST_SECRET not in r.stdout + r.stderr
    job = write_job(tmp_path / "k.yaml", "dcgan_digits.yaml",
                    storage={"path": "s3://b/runs", "endpoint_url": f"http://{TEST_KEY_ID}:{TEST_SECRET}@127.0.0.1:9"})
    r = rayganx("validate", job)
    assert r.returncode == 1 and "carries credentials" in r.stderr
    assert TEST_SECRET not in r.stdout + r.stderr
    job = write_job(tmp_path / "p.yaml", "dcgan_digits.yaml", storage={"path": "${RAYGANX_TEST_RUNS}/runs"})
    r = rayganx("validate", job, env={"RAYGANX_TEST_RUNS": str(tmp_path / "private-dir")})
    assert r.returncode == 0 and "path: ${RAYGANX_TEST_RUNS}/runs" in r.stdout and "private-dir" not in r.stdout


# --------------------------------------------------------------------------- faults in real runs


def _digits(tmp_path, name, steps, **over):
    job = write_job(tmp_path / f"{name}.yaml", "dcgan_digits.yaml", **tiny(name, tmp_path / "runs", steps=steps))
    return jobspec.load(job, ["model.ngf=16", "model.ndf=16", "train.batch_size=32", *over.pop("sets", [])])


def _kill_a_train_worker() -> int:
    for p in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
            os.kill(p.pid, signal.SIGKILL)
            return p.pid
    raise AssertionError("no Ray Train worker process found")


def test_worker_killed_mid_run_resumes_from_the_last_checkpoint(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYGANX_TEST_RUNS", str(tmp_path / "private-runs-dir"))
    # The default asynchronous upload, and the kill lands right after a checkpoint step, while
    # that checkpoint's upload may still be in flight: the run must resume from the last
    # checkpoint whose upload finished (that one, or the one before), never from a cut-off copy.
    sets = ["storage.checkpoint_every=4", "storage.path=${RAYGANX_TEST_RUNS}"]
    spec = _digits(tmp_path, "killed", 16, sets=["scaling.max_failures=2", *sets])
    assert spec.storage.async_upload
    seen, killed = [], {}

    def printer(m):
        seen.append(m["step"])
        if m["step"] >= 8 and m["step"] % 4 == 0 and not killed:
            killed.update(step=m["step"], pid=_kill_a_train_worker())

    t0 = time.monotonic()
    result = runner.run(spec, printer=printer)
    assert killed and result.steps == 16
    run = Store(spec.run_url)
    assert [m["step"] for m in read_metrics(run)] == list(range(2, 17, 2))
    restart = [json.loads(line) for p in sorted(Path(run.root, "metrics").iterdir())
               for line in p.read_text().splitlines() if "restart_from" in line]
    assert len(restart) == 1, restart
    resumed_from = restart[0]["restart_from"]
    # The worker died at or after the checkpoint step the printer saw: the run went back to that
    # checkpoint or, its upload cut off, the one before; never further.
    assert resumed_from % 4 == 0 and killed["step"] - 2 * spec.storage.checkpoint_every <= resumed_from < 16, \
        (seen, resumed_from)
    # every checkpoint listed at the end is complete, and loads
    listed = list_checkpoints(run)
    assert [c["step"] for c in listed][-1] == 16
    for c in listed:
        assert Path(run.root, f"checkpoint_{c['step']:06d}", MARKER).exists()
    print(f"FIGURE worker-kill: killed after step {killed['step']} was logged, resumed from step {resumed_from}, "
          f"run finished in {time.monotonic() - t0:.0f} s")
    # the killed worker's local copies are gone: the next rank 0 swept them at its checkpoint
    from rayganx.checkpointing import sweep_stale_copies

    assert sweep_stale_copies() == []
    # the ${VAR} placeholder, not its value, is what the run stores
    for f in Path(run.root).rglob("*"):
        if f.is_file() and f.suffix in (".yaml", ".pt", ".json", ".jsonl"):
            assert b"private-runs-dir" not in f.read_bytes(), f
    assert "${RAYGANX_TEST_RUNS}" in (Path(run.root) / "spec.yaml").read_text()

    # the newest checkpoint cut off: a resubmission resumes from the one before, and says so
    state = Path(run.root, "checkpoint_000016", "state.pt")
    state.write_bytes(state.read_bytes()[:1000])
    more = runner.run(_digits(tmp_path, "killed", 20, sets=sets))
    assert more.steps == 20
    rows = read_metrics(run)
    assert [m["step"] for m in rows if "event" not in m] == list(range(2, 21, 2))
    assert any(m.get("event") == "resume" and "checkpoint_000016 is incomplete" in m["note"] for m in rows)
    assert list_checkpoints(run)[-1]["step"] == 20


def test_divergence_rolls_back_to_the_last_checkpoint_and_finishes(ray_session, tmp_path, monkeypatch):
    # lr 1e3 from step 7 on: a real divergence, seen at the next log step (8)
    monkeypatch.setenv("RAYGANX_FAULT_LR_AT", "7:1000")
    spec = _digits(tmp_path, "diverge", 12, sets=["storage.checkpoint_every=4", "train.max_grad_norm=100"])
    result = runner.run(spec)
    assert result.steps == 12
    assert [(r["step"], r["diverged_at"], r["lr_scale"]) for r in result.rollbacks] == [(4, 8, 0.5)]
    rows = read_metrics(Store(spec.run_url))
    assert [m["step"] for m in rows if "event" not in m] == [2, 4, 6, 8, 10, 12]
    assert rows[-1]["lr_g"] == pytest.approx(0.5 * spec.train.optim_g.lr) and rows[-1]["rollbacks"] == 1
    state = load_state(f"{spec.run_url}/checkpoint_000012")
    assert state["lr_scale"] == 0.5
    assert state["batches"] == 16  # 12 steps, and the 4 rolled back: the data is not rewound
    assert all(torch.isfinite(v).all() for v in state["models"]["g"].values() if v.is_floating_point())


def _wait_for(proc, pattern: str, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if pattern in line:
            return lines
    raise AssertionError(f"{pattern!r} not seen in {timeout} s: {''.join(lines)[-2000:]}")


def _drain(stream) -> tuple[threading.Thread, list[str]]:
    """Reads a child's pipe in the background: a child blocked on a full pipe while the test
    waits on something else would pass for a hang."""
    lines: list[str] = []

    def read():
        for line in stream:
            lines.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, lines


class _SlowTrainer:
    def fit(self):
        time.sleep(20)
        return "finished"


def test_ctrl_c_during_fit_raises_at_once_even_when_the_interrupt_is_swallowed():
    """Python runs a signal handler wherever the main thread happens to be; a KeyboardInterrupt
    raised inside a finalizer is printed and dropped. Here a SIGUSR2 handler plays the finalizer:
    the SIGINT lands inside it and is swallowed, and Ctrl-C must still end the wait."""
    # As a terminal's Ctrl-C finds it, even when pytest itself runs where SIGINT is ignored (nohup, &)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    swallowed = []

    def finalizer_like(signum, frame):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                time.sleep(0.01)  # the SIGINT handler runs here, inside this one
        except KeyboardInterrupt:
            swallowed.append(True)

    old_usr2 = signal.signal(signal.SIGUSR2, finalizer_like)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR2))
    try:
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            runner.fit_interruptibly(_SlowTrainer())
        assert time.monotonic() - t0 < 5
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR2, old_usr2)
        restored = signal.signal(signal.SIGINT, before)
    assert swallowed, "the SIGINT did not land inside the other handler: the test did not test"
    assert restored is signal.default_int_handler  # fit put the caller's handler back


def test_a_caller_that_ignores_sigint_keeps_ignoring_it_during_fit():
    seen = []

    class Quick:
        def fit(self):
            seen.append(signal.getsignal(signal.SIGINT))
            return "finished"

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert runner.fit_interruptibly(Quick()) == "finished"
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.slow
def test_ctrl_c_stops_promptly_and_the_same_submit_continues(tmp_path):
    job = write_job(tmp_path / "ctrlc.yaml", "dcgan_digits.yaml",
                    **tiny("ctrlc", tmp_path / "runs", steps=100_000, train={"log_every": 2}))
    sets = ["--set", "storage.checkpoint_every=4", "--set", "model.ngf=16", "--set", "model.ndf=16",
            "--set", "train.batch_size=32"]
    # SIG_DFL in the child: a CLI started from a terminal, even when pytest runs with SIGINT ignored
    proc = subprocess.Popen([sys.executable, "-m", "rayganx.cli", "submit", str(job), *sets], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err_thread, err_lines = _drain(proc.stderr)
    try:
        _wait_for(proc, "step 10/100000", 300)  # long enough that only Ctrl-C ends it
        _drain(proc.stdout)
        second = rayganx("submit", job, *sets, timeout=120)  # the same run, while it is going
        assert second.returncode == 1 and "in use by" in second.stderr and "--force" in second.stderr, second.stderr
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the CLI's faulthandler: where it waits
            time.sleep(3)
            proc.kill()
            err_thread.join(10)
            pytest.fail("no exit within 60 s of SIGINT; its threads:\n" + "".join(err_lines)[-6000:])
        took = time.monotonic() - t0
        err_thread.join(10)
        stderr = "".join(err_lines)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "submit the same job again to continue from step" in stderr, stderr
    assert "Traceback" not in stderr
    run = tmp_path / "runs" / "ctrlc"
    assert not (run / "lock.json").exists()
    last = list_checkpoints(Store(str(run)))[-1]["step"]
    assert last >= 8
    print(f"FIGURE ctrl-c: exited {took:.1f} s after SIGINT, last complete checkpoint step {last}")
    r = rayganx("submit", job, *sets, "--set", f"train.steps={last + 4}", timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {last}" in r.stdout and f"step {last + 4}/{last + 4}" in r.stdout


def test_object_store_outage_ends_in_one_line_and_keeps_the_last_complete_checkpoint(ray_session, tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="outage")
    spec = _digits(tmp_path, "outage", 400, sets=["storage.path=s3://outage/runs", f"storage.endpoint_url={endpoint}",
                                                  "storage.checkpoint_every=4"])
    stopped = {}

    def printer(m):
        if m["step"] >= 10 and not stopped:
            server.stop()  # the store goes away mid-run
            stopped["at"] = time.monotonic()

    try:
        with pytest.raises(runner.RunError) as err:
            runner.run(spec, printer=printer)
        took = time.monotonic() - stopped["at"]
        message = str(err.value)
        # named by whichever client saw it first: Ray's upload (the store) or rayganx's (the run)
        assert re.fullmatch(r"s3://outage/runs(/outage(/\w+)*)?: the storage endpoint is unreachable", message), message
        assert took < 180, took
        print(f"FIGURE store-outage: failed {took:.1f} s after the store stopped: {message}")
    finally:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)  # moto keeps its state in-process
        server.start()
    try:
        ckpts = list_checkpoints(Store("s3://outage/runs/outage", endpoint))
        # the newest whose upload (asynchronous) finished before the store went away
        assert ckpts and ckpts[-1]["step"] >= 4
        assert load_state(ckpts[-1]["url"], endpoint)["step"] == ckpts[-1]["step"]
    finally:
        server.stop()
