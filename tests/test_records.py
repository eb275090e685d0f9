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
