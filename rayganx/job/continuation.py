"""Whether a stored run can go on under a job spec: the keys an attempt may change, and the
changes named for the user."""

from __future__ import annotations

from typing import Any

from rayganx.job.spec import JobSpec


# Keys a resumed run can honour when they change: how far and how wide it trains, and how often
# it logs, samples, evaluates and checkpoints. Any other change would mix two jobs in one run.
CONTINUABLE = ("train.steps", "train.epochs", "train.log_every", "samples.", "eval.every", "storage.checkpoint_every",
               "storage.keep", "storage.async_upload", "storage.outage_tolerance_s", "scaling.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every key whose value differs (a key that only one
    side has counts as None on the other)."""
    a, b = _flat(old), _flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def continuation_problems(stored: dict, spec: JobSpec) -> list[str]:
    """The changes from a run's stored spec that continuing it cannot honour, one line each
    (old -> new); empty when it can continue. Fewer train.steps than stored is such a change."""
    problems = []
    for key, old, new in changed_keys(stored, spec.to_dict()):
        if key == "train.steps" and isinstance(old, int) and isinstance(new, int) and new < old:
            problems.append(f"{key}: {old} -> {new} (fewer steps than the run was set to train)")
        elif not key.startswith(CONTINUABLE):
            problems.append(f"{key}: {old!r} -> {new!r}")
    return problems
