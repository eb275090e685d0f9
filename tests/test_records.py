"""Figures come from records: every generated table in the docs equals what docs/records.py makes
from the committed docs/records/*.jsonl, and every record names what produced it."""

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import records  # noqa: E402

FIELDS = {"time", "commit", "job", "sets", "seed", "machine", "wall_s", "metrics"}


def test_every_table_in_the_docs_is_regenerated_from_its_records():
    stale = records.render()
    assert not stale, f"tables differ from their records in {[str(p.relative_to(ROOT)) for p in stale]}: " \
                      f"python docs/records.py --write"


def test_every_record_names_its_commit_command_seed_and_machine():
    files = sorted(records.RECORDS.glob("*.jsonl"))
    assert files
    for f in files:
        rows = records.load(f.stem)
        assert rows, f
        for row in rows:
            assert FIELDS <= set(row), (f.name, sorted(FIELDS - set(row)))
            assert row["commit"] and row["machine"]["cores"] and isinstance(row["sets"], list), f.name


def test_a_changed_record_makes_its_table_stale(tmp_path, monkeypatch):
    # The check can fail: a record edited after the table was written shows up as a stale doc.
    rows = records.load("perf_celeba")
    assert rows
    edited = dict(rows[-1], metrics=dict(rows[-1]["metrics"], fid=1.2345))
    monkeypatch.setattr(records, "RECORDS", tmp_path)
    (tmp_path / "perf_celeba.jsonl").write_text(
        "".join(__import__("json").dumps(r) + "\n" for r in rows[:-1] + [edited]))
    for f in (ROOT / "docs" / "records").glob("*.jsonl"):
        if f.name != "perf_celeba.jsonl":
            (tmp_path / f.name).write_text(f.read_text())
    assert ROOT / "docs" / "performance.md" in records.render()


def _recorded_values() -> set[float]:
    """Every number in the committed records (run records and the searches' lines), as a fraction
    and as a percentage, at 0, 1 and 2 decimals: the precisions a comment prints."""
    import json

    out: set[float] = set()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            for d in (0, 1, 2):
                out.update((round(x, d), round(100 * x, d)))

    for f in [*(ROOT / "docs").glob("*.jsonl"), *records.RECORDS.glob("*.jsonl")]:
        for line in f.read_text().splitlines():
            walk(json.loads(line))
    return out


def _unsourced(text: str, values: set[float]) -> list[str]:
    import re

    bad = []
    for m in re.finditer(r"(\d+(?:\.\d+)?) ?%|FID (\d+(?:\.\d+)?)", text):
        figure = m.group(1) or m.group(2)
        places = len(figure.split(".")[1]) if "." in figure else 0
        if round(float(figure), places) not in values:
            bad.append(m.group(0))
    return bad


def test_every_score_in_a_job_comment_or_the_readme_is_in_a_committed_record():
    # A percentage or an FID that a job's comment or the README states was measured by a run whose
    # record is committed (docs/records/*.jsonl, the searches' docs/*.jsonl). Loose by design (any
    # record's value at the printed precision), it still catches a figure typed from memory.
    values = _recorded_values()
    for path in [*sorted((ROOT / "jobs").glob("*.yaml")), ROOT / "README.md"]:
        lines = path.read_text().splitlines()
        text = "\n".join(line.split("#", 1)[1] for line in lines if "#" in line) if path.suffix == ".yaml" \
            else "\n".join(lines)
        assert not _unsourced(text, values), f"{path.relative_to(ROOT)}: no record holds {_unsourced(text, values)}"
    # and the check can fail
    assert _unsourced("reached 12.345 % and FID 9999.9", values) == ["12.345 %", "FID 9999.9"]


def test_a_recipe_meets_the_baseline_its_sweep_tuned_as_well_as_the_default_one(tmp_path, monkeypatch):
    # Tuned against tuned: the column compares with the DCGAN row whose --sets the sweep record chose,
    # and stays empty without one (no baseline tuned, no claim).
    import json

    machine = {"cores": 2, "cpu": "x", "memory_gib": 24, "gpu": None, "python": "3", "torch": "t", "ray": "r"}
    tuned = ["train.optim_g.lr=0.0004"]

    def row(job, fid, seed, sets=()):
        return {"time": "t", "commit": "c", "job": f"jobs/{job}.yaml", "sets": [f"train.seed={seed}", *sets],
                "seed": seed, "machine": machine, "wall_s": 1.0,
                "metrics": {"fid": fid, "kid": 1.0, "is": 1.0, "precision": 0.5, "recall": 0.5}}

    rows = [row("dcgan_digits", 100.0, s) for s in (100, 101)] + [row("dcgan_digits", 80.0, s, tuned) for s in (100, 101)]
    rows += [row("sngan_digits", 60.0, 100), row("sngan_digits", 100.0, 101)]
    monkeypatch.setattr(records, "RECORDS", tmp_path)
    (tmp_path / "digits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sngan = lambda: next(line for line in records.TABLES["digits"]().splitlines() if "jobs/sngan_digits" in line)  # noqa: E731
    assert "| -20%, lower in 1 of 2 seeds |  |" in sngan()
    sweep = {**row("dcgan_digits", 80.0, 0, tuned), "sets": tuned, "sweep": "tune_dcgan_as_sngan", "trials": []}
    (tmp_path / "sweeps.jsonl").write_text(json.dumps(sweep) + "\n")
    assert "| -20%, lower in 1 of 2 seeds | +0%, lower in 1 of 2 seeds |" in sngan()
    assert "(the best of `jobs/tune_dcgan_as_sngan.yaml`)" in records.TABLES["digits"]()
    # On held-out data: each recipe re-tuned on other classes meets DCGAN re-tuned there, on the same classes.
    held = ["data.classes=[5, 6]"]
    sn_sets, dc_sets = ["train.optim_g.lr=0.0001"], ["train.optim_g.lr=0.0002"]
    rows += [row("dcgan_digits", 50.0, s, [*dc_sets, *held]) for s in (100, 101)]
    rows += [row("sngan_digits", f, s, [*sn_sets, *held]) for f, s in ((40.0, 100), (45.0, 101))]
    (tmp_path / "digits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sweeps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (sweep, {
        **sweep, "sets": dc_sets, "sweep_file": "docs/sweeps/d.yaml"}, {
        **sweep, "job": "jobs/sngan_digits.yaml", "sets": sn_sets, "sweep_file": "docs/sweeps/s.yaml"})))
    held_row = next(line for line in records.TABLES["digits"]().splitlines() if "sngan" in line and "classes" in line)
    assert "(the best of `docs/sweeps/s.yaml`)" in held_row and "| -15%, lower in 2 of 2 seeds |" in held_row
    # A recipe run at settings no sweep chose is neither tuned nor default: no claim either way.
    rows.append(row("sngan_digits", 10.0, 100, ["train.optim_g.lr=0.3"]))
    (tmp_path / "digits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    untuned = next(line for line in records.TABLES["digits"]().splitlines() if "lr=0.3" in line)
    assert "|  |  | 10.0 |" in untuned, untuned
    # Only unconditional GANs meet DCGAN: a conditional GAN learns from the labels, a VAE is another model.
    rows += [row("cgan_digits", 10.0, 100), row("vae_digits", 10.0, 100)]
    (tmp_path / "digits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for job in ("cgan_digits", "vae_digits"):
        line = next(line for line in records.TABLES["digits"]().splitlines() if f"jobs/{job}" in line)
        assert "|  |  | 10.0 |" in line, line
