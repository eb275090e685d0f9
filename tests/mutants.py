"""Mutation check: break the package in small, named ways and see that the tests catch each.

    python tests/mutants.py            # every mutant (about 10 minutes on 2 cores)
    python tests/mutants.py -k lock    # those whose name contains "lock"
    python tests/mutants.py --list

Each mutant is one textual change to a copy of the package (the working tree is never touched)
and the tests that should catch it; it is caught when those tests fail. Not part of CI's run:
the suite itself is what CI runs; this checks that the suite can fail. The last line is the
count caught / tried.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    file: str  # under rayganx/, e.g. training/loop.py
    old: str  # must occur exactly once
    new: str
    tests: list[str]  # pytest node ids or files, relative to the repository


MUTANTS = [
    Mutant("skip the model restore", "training/tasks.py",
           "            unwrap(m).load_state_dict(state[\"models\"][k])", "            pass",
           ["tests/test_resume.py::test_a_restored_task_continues_exactly_as_the_one_that_saved_it",
            "tests/test_faults.py::test_a_2d_job_killed_and_resumed_ends_equal_to_the_uninterrupted_run"]),
    Mutant("skip the optimiser restore", "training/tasks.py",
           "            o.load_state_dict(state[\"optimizers\"][k])", "            pass",
           ["tests/test_resume.py::test_a_restored_task_continues_exactly_as_the_one_that_saved_it"]),
    Mutant("skip the RNG restore", "training/loop.py",
           "            randomness.restore(rng[rank])  # each rank continues its own global streams",
           "            pass",
           # GAN draws are functions of the data position: only the classifier's dropout reads these streams
           ["tests/test_faults.py::test_a_classifier_killed_mid_run_resumes_with_each_ranks_random_streams"]),
    Mutant("skip the data position restore", "training/loop.py",
           "            self.position = Position.from_dict(state.get(\"position\"))", "            pass",
           ["tests/test_faults.py::test_a_worker_killed_mid_run_resumes_to_the_uninterrupted_run_bitwise"]),
    Mutant("draws per rank, not per global batch", "models/randomness.py",
           "        return full[self.rank * n:(self.rank + 1) * n]", "        return full[:n]",
           ["tests/test_resume.py::test_draws_of_a_global_batch_do_not_depend_on_the_worker_count"]),
    Mutant("evaluation moves the training streams", "evaluation/metrics.py",
           "    with isolated():  # KID averages random subsets", "    with contextlib.nullcontext():  #",
           ["tests/test_resume.py::test_evaluation_leaves_the_training_streams_where_they_were"]),
    Mutant("CAS moves the training streams", "evaluation/metrics.py",
           "    with isolated():  # in training: the run's own noise streams go on untouched",
           "    with contextlib.nullcontext():",
           ["tests/test_resume.py::test_evaluation_leaves_the_training_streams_where_they_were"]),
    Mutant("drop the gradient-penalty term", "training/tasks.py",
           "                total_d = total_d + t.gp_lambda * t.gp_every * gp", "                pass",
           ["tests/test_regularisers.py"]),
    Mutant("drop spectral norm", "models/networks.py",
           "    if m.spectral_norm in (\"d\", \"both\"):\n        apply_spectral_norm(nets[\"d\"])",
           "    if False:\n        apply_spectral_norm(nets[\"d\"])", ["tests/test_regularisers.py"]),
    Mutant("drop DiffAugment", "training/tasks.py",
           "        x = losses.diffaugment(x, t.diffaug, draws) if t.diffaug else x", "        x = x",
           ["tests/test_regularisers.py"]),
    Mutant("ignore grad_clip", "training/tasks.py",
           "        clip = self.spec.train.grad_clip or math.inf", "        clip = math.inf",
           ["tests/test_regularisers.py"]),
    Mutant("ignore keep_best_by", "training/runner.py",
           "                num_to_keep=spec.storage.keep, checkpoint_score_attribute=best,",
           "                num_to_keep=spec.storage.keep, checkpoint_score_attribute=None,",
           ["tests/test_metrics.py::test_training_evaluates_keeps_best_and_cli_matches_the_two_worker_value"]),
    Mutant("accept a checkpoint without its marker", "store/runs.py",
           "        return \"no completion marker (cut off while being written?)\", {}",
           "        return None, {\"files\": {}}",
           ["tests/test_faults.py::test_truncated_newest_checkpoint_is_ignored_by_list_pull_and_sample"]),
    Mutant("load with pickle", "store/storage.py",
           "map_location=map_location, weights_only=True)", "map_location=map_location, weights_only=False)",
           ["tests/test_faults.py::test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run"]),
    Mutant("skip the run lock", "store/lock.py",
           "        note = None\n        try:\n            self.version = self.run.create(self._body(), LOCK)",
           "        return None\n        try:\n            self.version = self.run.create(self._body(), LOCK)",
           ["tests/test_faults.py::test_run_lock_refuses_a_second_writer_and_takes_over_a_stale_one",
            "tests/test_storage.py::test_two_submits_at_once_one_trains_and_a_forced_takeover_stops_the_first"]),
    Mutant("a lock that is not atomic", "store/storage.py",
           "                os.link(tmp, target)  # atomic, and fails when the name exists: the whole file or nothing",
           "                os.replace(tmp, target)\n                tmp = target + '.gone'\n                open(tmp, 'w').close()",
           ["tests/test_faults.py::test_of_two_processes_taking_a_run_at_once_exactly_one_wins"]),
    Mutant("write metrics in place", "store/runs.py",
           "        name = f\"part_{self.seq:06d}\" + (f\"_{self.writer}\" if self.writer else \"\") + \".jsonl\"",
           "        name = \"part_000000.jsonl\"",
           ["tests/test_faults.py::test_metrics_log_appends_parts_and_the_reader_survives_torn_lines",
            "tests/test_faults.py::test_two_writers_of_one_run_never_overwrite_each_others_parts"]),
    Mutant("let a key leave its destination", "store/storage.py",
           "    why = unsafe_key(rel)\n    if why:", "    why = None\n    if why:",
           ["tests/test_storage.py::test_crafted_keys_in_a_shared_bucket_write_nothing_outside_the_destination"]),
    Mutant("no retry through a store outage", "store/uploads.py",
           "            if now - failed_at >= tolerance_s:", "            if True:",
           ["tests/test_storage.py::test_a_store_outage_shorter_than_the_tolerance_loses_nothing_a_longer_one_ends_the_run_cleanly"]),
    Mutant("continue a changed job silently", "training/runner.py",
           "    if start > 0 and stored is not None and not allow_changes:",
           "    if False:",
           ["tests/test_resume.py::test_a_changed_job_is_refused_naming_each_change_and_nothing_is_written"]),
    Mutant("reuse a checkpoint folder name", "training/checkpointing.py",
           "    return f\"checkpoint_{step:06d}\" + (f\"_{generation}\" if generation else \"\")",
           "    return f\"checkpoint_{step:06d}\"",
           ["tests/test_faults.py::test_a_worker_killed_mid_run_resumes_to_the_uninterrupted_run_bitwise"]),
    Mutant("CAS trains on real rows", "evaluation/metrics.py",
           "        on_fake = fit_classifier(fake, y_train, spec, num_classes, seed, steps)",
           "        on_fake = fit_classifier(x_train, y_train, spec, num_classes, seed, steps)",
           ["tests/test_synthetic.py::test_cas_of_an_untrained_generator_is_near_chance"]),
    Mutant("an exploiter loads the donor checkpoint it was named, pruned or not", "training/checkpointing.py",
           "    if any(c[\"name\"] == name for c in ckpts) or not ckpts:", "    if True:",
           ["tests/test_tune.py::test_an_exploit_whose_donor_pruned_the_named_checkpoint_takes_the_donors_newest"]),
    Mutant("a failed trial's status is Ray's header", "training/failures.py",
           "        if isinstance(e, UserError) and getattr(e, \"cause\", None) is None:",
           "        if isinstance(e, UserError):",
           ["tests/test_tune.py::test_a_failed_trial_reads_as_its_error_not_as_rays_header"]),
    Mutant("a sweep with a failed trial exits 0", "cli/sweeps.py",
           "    if failed:\n        err.print(", "    if False:\n        err.print(",
           ["tests/test_tune.py::test_relative_paths_in_the_space_are_the_drivers_and_a_failed_trial_fails_the_sweep"]),
]


def apply(copy: Path, m: Mutant) -> None:
    path = copy / "rayganx" / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutant {m.name!r}: its text occurs {text.count(m.old)} times in rayganx/{m.file}; "
                         f"the code changed, update the mutant")
    path.write_text(text.replace(m.old, m.new))


def run(m: Mutant, keep: bool) -> tuple[bool, float, str]:
    copy = Path(tempfile.mkdtemp(prefix="rayganx_mutant_"))
    try:
        shutil.copytree(ROOT / "rayganx", copy / "rayganx", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "jobs", copy / "jobs")
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, copy / name)
        (copy / "docs").mkdir()
        apply(copy, m)
        # The copy's package first on every path a test reaches: this process, CLI subprocesses, and
        # the Ray head the tests start (its workers inherit the environment).
        env = {**os.environ, "PYTHONPATH": str(copy)}
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        return r.returncode not in (0, 5), time.monotonic() - t0, tail
    finally:
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", help="only mutants whose name contains this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep each mutated copy (its path is printed)")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.k or args.k in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}: rayganx/{m.file} -> {', '.join(m.tests)}")
        return 0
    caught = 0
    for m in chosen:
        ok, took, tail = run(m, args.keep)
        caught += ok
        print(f"{'caught' if ok else 'MISSED'}  {m.name}  ({took:.0f} s)" + ("" if ok else f"\n{tail}"), flush=True)
    print(f"{caught} / {len(chosen)} mutants caught")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
