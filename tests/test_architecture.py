"""The package's structure as docs/architecture.md describes it, checked against the code."""

import ast
import re
import subprocess
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import architecture  # noqa: E402

PACKAGE = ROOT / "rayganx"
MAX_LINES = 430  # the "no module over ~400 lines"


def test_the_checked_in_graph_is_the_code_s_and_has_no_cycle():
    assert architecture.block() in (ROOT / "docs" / "architecture.md").read_text(), \
        "docs/architecture.md is stale: python docs/architecture.py --write"
    assert architecture.cycles(architecture.graph()) == []
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "architecture.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_cycle_check_finds_a_cycle():
    assert architecture.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_every_module_is_in_the_table_and_none_is_long():
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `([a-z0-9_/]+)`(?:, `([a-z0-9_]+)`)? \|", text, re.M))
    names = {n for pair in listed for n in pair if n}
    for path in PACKAGE.glob("*.py"):
        if path.stem not in ("__init__", "__main__"):
            assert path.stem in names, f"docs/architecture.md: no row for rayganx/{path.name}"
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"rayganx/{path.name} is over {MAX_LINES} lines"
    for path in (PACKAGE / "cli").glob("*.py"):
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"rayganx/cli/{path.name} is over {MAX_LINES} lines"


def test_no_module_imports_another_s_private_names():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rayganx"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"
