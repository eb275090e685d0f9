"""Runs that survive faults: unsafe files, cut-off checkpoints, a second writer, secrets, and
real faults injected into real runs (a killed worker, Ctrl-C, a store outage, divergence)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from rayganx.training import runner, stopping
from rayganx.job import spec as jobspec
from rayganx.store.lock import LockLostError, RunLock, RunLockedError
from rayganx.store.runs import (CHECKPOINT_RE, MARKER, MetricsLog, checkpoint_manifest, list_checkpoints, load_state,
    read_metrics, scan_checkpoints)
from rayganx.store.storage import Store, StorageError
from tests.conftest import JOBS, ROOT, TEST_KEY_ID, TEST_SECRET, local_checkpoint, rayganx, tiny, write_job
from tests.test_resume import assert_same_state


def _checkpoint(run: Path, step: int, spec) -> Path:
    """A real checkpoint folder as the train loop writes it (without Ray), marker last."""
    from rayganx.training.tasks import GANTask

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
    from rayganx.models import trained

    g, _, _ = trained.load_generator(str(tmp_path / "generator.pt"))
    z = torch.randn(2, spec.model.latent_dim)
    assert torch.allclose(torch.export.load(str(tmp_path / "generator.pt2")).module()(z), g(z), atol=1e-5)


def test_metrics_log_appends_parts_and_the_reader_survives_torn_lines(tmp_path):
    run = Store(str(tmp_path / "run"))
    log = MetricsLog(run, 0, flush_every_s=3600, writer="aaaa1111")
    for step in (2, 4):
        log.append({"step": step, "loss": step})
    log.append({"step": 6, "loss": 6}, force=True)  # a checkpoint step flushes
    log.append({"step": 8, "loss": 8})  # never flushed: the process dies here
    assert [m["step"] for m in read_metrics(run)] == [2, 4, 6]
    parts = sorted((tmp_path / "run" / "metrics").iterdir())
    assert [p.name for p in parts] == ["part_000000_aaaa1111.jsonl"]  # named by its writer
    # an attempt resumed from the checkpoint at step 4 supersedes what came after it
    resumed = MetricsLog(run, 4, flush_every_s=3600, writer="bbbb2222")
    resumed.append({"step": 6, "loss": 60}, force=True)
    assert [(m["step"], m["loss"]) for m in read_metrics(run)] == [(2, 2), (4, 4), (6, 60)]
    with open(parts[0], "a") as f:
        f.write('{"step": 7, "lo')  # a torn line (written by something else, or a bad disk)
    assert [m["step"] for m in read_metrics(run)] == [2, 4, 6]
    assert read_metrics(run, last_only=True)[0]["loss"] == 60


def test_two_writers_of_one_run_never_overwrite_each_others_parts(tmp_path):
    # Two processes that both think they hold the run pick the same next part number: each part
    # is created, never replaced, and carries its writer's name, so both survive whole.
    run = Store(str(tmp_path / "run"))
    a, b = MetricsLog(run, 0, writer="aaaa1111"), MetricsLog(run, 0, writer="bbbb2222")
    a.append({"step": 2, "who": "a"}, force=True)
    b.append({"step": 2, "who": "b"}, force=True)
    names = sorted(p.name for p in (tmp_path / "run" / "metrics").iterdir())
    assert names == ["part_000000_aaaa1111.jsonl", "part_000000_bbbb2222.jsonl"]
    assert {json.loads(p.read_text())["who"] for p in (tmp_path / "run" / "metrics").iterdir()} == {"a", "b"}
    with pytest.raises(FileExistsError):  # the same writer's name twice is refused, not overwritten
        run.create(b"x", "metrics", "part_000000_aaaa1111.jsonl")


def test_local_checkpoint_copies_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    from rayganx.training.checkpointing import CKPT_PREFIX, sweep_stale_copies

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


def _lock_cases(tmp_path, s3_server):
    return [Store(str(tmp_path / "run")), Store("s3://rayganx-test/locks/run", s3_server)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_run_lock_refuses_a_second_writer_and_takes_over_a_stale_one(tmp_path, s3_server, where):
    run = _lock_cases(tmp_path, s3_server)[["local", "s3"].index(where)]
    first = RunLock(run, heartbeat_s=0.2, stale_after=2)
    assert first.acquire() is None
    with pytest.raises(RunLockedError, match=r"in use by .*@.* \(pid \d+\), last heartbeat \d+ s ago; .*--force"):
        RunLock(run).acquire()
    time.sleep(1.0)
    held, _ = first.holder()
    assert held["pid"] == os.getpid() and time.time() - held["heartbeat"] < 1.0  # the heartbeat runs
    forced = RunLock(run)
    assert "(--force)" in forced.acquire(force=True)
    # the first holder's next heartbeat (0.2 s) finds another token: it has lost the lock (a loaded
    # machine can delay that beat: waited for, up to 10 s)
    deadline = time.time() + 10
    while not first.lost.is_set() and time.time() < deadline:
        time.sleep(0.05)
    assert first.lost.is_set() and "taken over" in first.why_lost
    with pytest.raises(LockLostError):
        first.check()
    first.release()  # no longer the holder: leaves the new holder's lock alone
    assert forced.holder()[0]["token"] == forced.token
    forced._stop.set()  # the process "dies": no more heartbeats, no release
    forced._thread.join()
    stale = RunLock(run, stale_after=0.5)
    time.sleep(0.6)
    assert "no heartbeat for" in stale.acquire()
    stale.release()
    assert stale.holder() == (None, None)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_processes_taking_a_run_at_once_exactly_one_wins(tmp_path, s3_server, where):
    # Conditional writes decide, not timing: eight takers at once (a fresh lock, then a stale one).
    # Stale after 2 s, not less: on a loaded machine the eight reads can spread over a second, and a
    # taker that reads the new holder's lock later than stale_after rightly takes it over.
    run = _lock_cases(tmp_path, s3_server)[["local", "s3"].index(where)]
    for round_ in ("fresh", "stale"):
        barrier, won, refused = threading.Barrier(8), [], []

        def take():
            lock = RunLock(run, stale_after=2.0)
            barrier.wait()
            try:
                lock.acquire()
                won.append(lock)
            except RunLockedError:
                refused.append(lock)

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 7, (round_, len(won))
        assert won[0].still_held()
        won[0]._stop.set()  # dies holding it: the next round finds a stale lock
        won[0]._thread.join()
        time.sleep(2.1)


def test_a_lock_whose_process_is_gone_is_taken_over_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = Store(str(tmp_path / "run"))
    lock = RunLock(run)
    lock.info["pid"] = int(dead.stdout)
    lock.acquire()
    lock._stop.set()
    lock._thread.join()
    assert "its process is gone" in RunLock(run).acquire()


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


def _raw_rows(run: Store) -> list[dict]:
    return [json.loads(line) for p in sorted(Path(run.root, "metrics").iterdir()) for line in p.read_text().splitlines()]


# The job every exact-resume test runs: digits as an image folder, decoded by Ray Data, 2 DDP workers,
# with the draws that make a resume hard to get right (EMA, DiffAugment, instance noise, lazy R1).
EXACT = ["model.ngf=8", "model.ndf=8", "train.batch_size=32", "train.log_every=2", "storage.checkpoint_every=4",
         "storage.keep=10", "train.ema_decay=0.9", "train.diffaug=[translation]", "train.instance_noise=0.05",
         "train.r1_gamma=0.1", "train.r1_every=3", "samples.every=1000"]
STEPS = 40


@pytest.fixture(scope="module")
def exact(ray_session, tmp_path_factory):
    """The exact-resume job, and its uninterrupted run to step 40 (the reference)."""
    from rayganx.data.prepare import prepare_digits

    tmp = tmp_path_factory.mktemp("exact")
    prepare_digits(str(tmp / "digits"), "folder", size=32)
    job = write_job(tmp / "exact.yaml", "dcgan_digits.yaml", name="exact", storage={"path": str(tmp / "runs")},
                    data={"source": "image_folder", "path": str(tmp / "digits"), "labels": False})
    sets = [*EXACT, f"train.steps={STEPS}"]
    runner.run(jobspec.load(job, sets))
    return {"job": job, "sets": sets, "tmp": tmp, "ref": load_state(f"{tmp}/runs/exact/checkpoint_{STEPS:06d}")}


def test_a_classifier_killed_mid_run_resumes_with_each_ranks_random_streams(ray_session, tmp_path):
    # Every GAN draw is a function of the seed and the data position; a classifier's dropout draws
    # from each rank's global streams. Only a resume that puts those back, per rank, ends bitwise
    # equal to the uninterrupted run (2 workers, a kill after step 8).
    sets = ["model.ndf=8", "train.batch_size=32", "train.steps=16", "train.log_every=2", "storage.checkpoint_every=4",
            "storage.keep=10", "scaling.max_failures=2"]
    ref = runner.run(jobspec.load(JOBS / "cnn_digits.yaml", [*sets, f"storage.path={tmp_path}/ref"]))
    killed = {}

    def printer(m):
        if m["step"] >= 8 and m["step"] % 4 == 0 and not killed:
            killed.update(step=m["step"], pid=_kill_a_train_worker())

    result = runner.run(jobspec.load(JOBS / "cnn_digits.yaml", [*sets, f"storage.path={tmp_path}/killed"]),
                        printer=printer)
    assert killed and result.steps == 16
    assert any("restart_from" in r and r["restart_from"] > 0 for r in _raw_rows(Store(result.run_url)))
    state, expected = load_state(result.checkpoints[-1]["url"]), load_state(ref.checkpoints[-1]["url"])
    assert result.checkpoints[-1]["step"] == ref.checkpoints[-1]["step"] == 16
    assert_same_state(state, expected)


def test_a_worker_killed_mid_run_resumes_to_the_uninterrupted_run_bitwise(exact, monkeypatch):
    # The default asynchronous upload, and the kill lands right after a checkpoint step, while that
    # checkpoint's upload may still be in flight: the run resumes from it or, cut off, the one before;
    # never from step 0, never from a cut-off copy; and ends with every tensor equal to the reference.
    monkeypatch.setenv("RAYGANX_TEST_RUNS", str(exact["tmp"] / "private-runs-dir"))
    spec = jobspec.load(exact["job"], [*exact["sets"], "name=killed", "scaling.max_failures=2",
                                       "storage.path=${RAYGANX_TEST_RUNS}"])
    killed = {}

    def printer(m):
        if m["step"] >= 8 and m["step"] % 4 == 0 and not killed:
            killed.update(step=m["step"], pid=_kill_a_train_worker())

    t0 = time.monotonic()
    result = runner.run(spec, printer=printer)
    assert killed and result.steps == STEPS
    run = Store(spec.run_url)
    raw = _raw_rows(run)
    restart = [i for i, r in enumerate(raw) if "restart_from" in r]
    assert len(restart) == 1, raw
    resumed_from = raw[restart[0]]["restart_from"]
    reached = max(r["step"] for r in raw[:restart[0]] if "step" in r)  # logged before the restart
    # a resume, not a restart from step 0, and at most one checkpoint interval lost
    assert 0 < resumed_from and reached - resumed_from <= spec.storage.checkpoint_every, (killed, resumed_from, reached)
    final = list_checkpoints(run)[-1]  # checkpoint_000040, with a generation when the resume took a newer one
    assert final["step"] == STEPS
    state = load_state(final["url"])
    assert_same_state(state, exact["ref"])  # weights, optimisers and the EMA copy, bitwise
    assert state["position"] == exact["ref"]["position"]
    rows = read_metrics(run)
    assert [m["step"] for m in rows if "event" not in m] == list(range(2, STEPS + 1, 2))  # every row, once
    # When the restart did not take the checkpoint Ray offered (a newer complete one, or the one
    # before a cut-off copy), the log says so, at the step it resumed from.
    assert all(m["step"] == resumed_from and ("not yet registered" in m["note"] or "is incomplete" in m["note"])
               for m in rows if "event" in m), rows
    print(f"FIGURE worker-kill: killed after step {killed['step']} was logged, resumed from step {resumed_from}, "
          f"run finished in {time.monotonic() - t0:.0f} s, state equal to the uninterrupted run")
    # the killed worker's local copies are gone: the next rank 0 swept them at its checkpoint
    from rayganx.training.checkpointing import sweep_stale_copies

    assert sweep_stale_copies() == []
    # the ${VAR} placeholder, not its value, is what the run stores
    for f in Path(run.root).rglob("*"):
        if f.is_file() and f.suffix in (".yaml", ".pt", ".json", ".jsonl"):
            assert b"private-runs-dir" not in f.read_bytes(), f
    assert "${RAYGANX_TEST_RUNS}" in (Path(run.root) / "spec.yaml").read_text()

    # the newest checkpoint cut off: a resubmission resumes from the one before, says so, and the
    # folders it writes from there carry a generation (the cut-off one's name is never reused)
    state_file = Path(run.root, final["name"], "state.pt")
    generation = int(CHECKPOINT_RE.match(final["name"]).group(2) or 0)
    state_file.write_bytes(state_file.read_bytes()[:1000])
    more = runner.run(jobspec.load(exact["job"], [*exact["sets"], "name=killed", "storage.path=${RAYGANX_TEST_RUNS}",
                                                  f"train.steps={STEPS + 4}"]))
    assert more.steps == STEPS + 4
    rows = read_metrics(run)
    assert any(m.get("event") == "resume" and f"{final['name']} is incomplete" in m["note"] for m in rows)
    assert [c["name"] for c in list_checkpoints(run)][-2:] == [f"checkpoint_{STEPS:06d}_{generation + 1}",
                                                               f"checkpoint_{STEPS + 4:06d}_{generation + 1}"]


def test_evaluation_every_few_steps_does_not_change_the_weights(exact):
    spec = jobspec.load(exact["job"], [*exact["sets"], "name=evaluated", "eval.every=4", "eval.num_samples=64",
                                       "samples.every=4"])
    runner.run(spec)
    assert_same_state(load_state(f"{spec.run_url}/checkpoint_{STEPS:06d}"), exact["ref"])
    assert "fid" in read_metrics(Store(spec.run_url))[-1]  # it did evaluate (and sample) along the way


def test_a_2d_job_killed_and_resumed_ends_equal_to_the_uninterrupted_run(ray_session, tmp_path):
    sets = ["train.steps=60", "storage.checkpoint_every=20", "train.log_every=10", "storage.keep=5",
            f"storage.path={tmp_path}", "samples.every=1000", "scaling.num_workers=1"]
    assert runner.run(jobspec.load(JOBS / "pacgan_ring.yaml", [*sets, "name=ring_ref"])).steps == 60
    killed = {}

    def printer(m):
        if m["step"] >= 30 and not killed:
            killed["pid"] = _kill_a_train_worker()

    spec = jobspec.load(JOBS / "pacgan_ring.yaml", [*sets, "name=ring_killed", "scaling.max_failures=1"])
    assert runner.run(spec, printer=printer).steps == 60 and killed
    assert any("restart_from" in r for r in _raw_rows(Store(spec.run_url)))
    assert_same_state(load_state(f"{tmp_path}/ring_killed/checkpoint_000060"),
                      load_state(f"{tmp_path}/ring_ref/checkpoint_000060"))


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
    assert state["position"]["batches"] == 16  # 12 steps, and the 4 rolled back: the data is not rewound
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
            stopping.fit_interruptibly(_SlowTrainer())
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
        assert stopping.fit_interruptibly(Quick()) == "finished"
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.slow
def test_ctrl_c_stops_promptly_and_the_same_submit_ends_equal_to_the_uninterrupted_run(exact, on_head):
    job, sets = exact["job"], [a for s in [*exact["sets"], "name=ctrlc"] for a in ("--set", s)]
    # SIG_DFL in the child: a CLI started from a terminal, even when pytest runs with SIGINT ignored.
    # Its own embedded Ray: what Ctrl-C of `rayganx submit` means for a user. The very job of the
    # reference (its step count too: the instance noise anneals over it), each upload made to take
    # 2 s (a throttled store), so the run is still short of its end when the interrupt comes.
    proc = subprocess.Popen([sys.executable, "-m", "rayganx.cli", "submit", str(job), *sets], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "RAYGANX_FAULT_SLOW_UPLOAD_S": "2"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err_thread, err_lines = _drain(proc.stderr)
    try:
        _wait_for(proc, f"step 10/{STEPS}", 300)
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
    run = exact["tmp"] / "runs" / "ctrlc"
    assert not (run / "lock.json").exists()
    last = list_checkpoints(Store(str(run)))[-1]["step"]
    assert 4 <= last < STEPS, last  # interrupted mid-run, after a checkpoint
    print(f"FIGURE ctrl-c: exited {took:.1f} s after SIGINT, last complete checkpoint step {last}")
    # The same submit goes on from there to the end (on the session's Ray: the embedded start was the point above).
    r = rayganx("submit", job, *sets, env=on_head, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {last}" in r.stdout and f"step {STEPS}/{STEPS}" in r.stdout
    assert_same_state(load_state(str(run / f"checkpoint_{STEPS:06d}")), exact["ref"])


def test_a_forced_take_over_survives_a_heartbeat_between_its_read_and_its_write(tmp_path, monkeypatch):
    # The live holder beats after --force read its lock and before it wrote: the take-over reads
    # again and takes the lock (it lost to the same holder's beat, not to another taker).
    run = Store(str(tmp_path / "run"))
    first = RunLock(run, heartbeat_s=3600)
    assert first.acquire() is None
    write, beats = run.replace, []

    def replace(data, version, *parts):
        if not beats:  # the holder's heartbeat lands here, between the read and the write
            beats.append(1)
            first.version = write(first._body(), first.version, *parts)
        return write(data, version, *parts)

    monkeypatch.setattr(run, "replace", replace)
    forced = RunLock(run)
    assert "(--force)" in forced.acquire(force=True) and beats
    assert forced.holder()[0]["token"] == forced.token
    first._stop.set()
    forced.release()
