"""What the measuring scripts under docs/ share (docs/experiments.py): seeds, held-out seeds,
the sections of docs/results.md, and a recipe search run end to end, without Ray."""

import json
import subprocess
import sys

from tests.conftest import JOBS, ROOT

sys.path.insert(0, str(ROOT / "docs"))
import experiments  # noqa: E402


def test_seed_lists_and_ranges():
    assert experiments.seed_list("0,1,2") == [0, 1, 2]
    assert experiments.seed_list("100-104") == [100, 101, 102, 103, 104]
    assert experiments.seed_list("0, 5-7") == [0, 5, 6, 7]
    assert experiments.parser("x").parse_args([]).seeds == list(experiments.HELD_OUT)


def test_a_section_is_replaced_and_the_others_kept(tmp_path, monkeypatch):
    results = tmp_path / "results.md"
    results.write_text("# Results on digits\n\nold digits\n\n## 2-D mixtures\n\nold modes\n\n## Image completion\n\nkept\n")
    monkeypatch.setattr(experiments, "RESULTS", results)
    experiments.replace_section("## 2-D mixtures", "## 2-D mixtures\n\nnew modes\n")
    experiments.replace_section("# Results on digits", "# Results on digits\n\nnew digits\n")
    experiments.replace_section("## Synthetic training data", "## Synthetic training data\n\nadded\n")
    assert results.read_text() == ("# Results on digits\n\nnew digits\n\n## 2-D mixtures\n\nnew modes\n\n"
                                   "## Image completion\n\nkept\n\n## Synthetic training data\n\nadded\n")
    experiments.replace_section("## Image completion", "changed\n", no_write=True)
    assert "kept" in results.read_text()
    # a new section goes right after the one it belongs beside
    experiments.replace_section("## 2-D: PacGAN", "## 2-D: PacGAN\n\nits own\n", after="## 2-D mixtures")
    assert results.read_text() == ("# Results on digits\n\nnew digits\n\n## 2-D mixtures\n\nnew modes\n\n"
                                   "## 2-D: PacGAN\n\nits own\n\n## Image completion\n\nkept\n\n"
                                   "## Synthetic training data\n\nadded\n")


def test_a_search_runs_its_seeds_writes_a_line_each_and_refuses_held_out_seeds(tmp_path):
    out = tmp_path / "search.jsonl"
    cmd = [sys.executable, str(ROOT / "docs" / "mode_search.py"), str(JOBS / "pacgan_ring.yaml"),
           "--set", "train.steps=20", "--set", "train.batch_size=64", "--label", "tiny", "--out", str(out)]
    r = subprocess.run([*cmd, "--seeds", "0-1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["seed"], row["label"], row["overrides"]) for row in rows] == [
        (0, "tiny", ["train.steps=20", "train.batch_size=64"]), (1, "tiny", ["train.steps=20", "train.batch_size=64"])]
    assert all(0 <= row["modes"] <= 8 and 0 <= row["hq"] <= 1 for row in rows)
    assert rows[0]["modes"] != rows[1]["modes"] or rows[0]["hq"] != rows[1]["hq"]  # two seeds, two runs
    assert "SUMMARY tiny:" in r.stdout and "over 2 seeds" in r.stdout

    r = subprocess.run([*cmd, "--seeds", "3,101"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "seeds [101] are held out" in r.stderr
    assert len(out.read_text().splitlines()) == 2  # refused before anything ran
