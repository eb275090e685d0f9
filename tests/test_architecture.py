"""The package's structure as docs/architecture.md describes it, checked against the code."""

import ast
import re
import subprocess
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import architecture  # noqa: E402

PACKAGE = ROOT / "rayganx"
MAX_LINES = 400


def test_the_checked_in_layers_and_graph_are_the_code_s():
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert architecture.block() in text and architecture.layers_block() in text, \
        "docs/architecture.md is stale: python docs/architecture.py --write"
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "architecture.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_import_goes_the_way_its_subpackage_s_docstring_allows_and_none_cycles():
    g = architecture.graph()
    rules = architecture.layers()
    assert set(rules) == {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert architecture.violations(g, rules) == []
    assert architecture.cycles(g) == []
    # Every module lives in a subpackage: nothing beside them but the package's own __init__.
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py"]


def test_the_layering_check_finds_a_wrong_way_import_and_a_package_cycle():
    rules = architecture.layers()
    g = architecture.graph()
    # The run store reaching up into the training loop: the import a shortcut would add.
    wrong = {**g, "store.runs": g["store.runs"] | {"training.loop"}}
    assert "store.runs imports training.loop: store may import job" in architecture.violations(wrong, rules)
    # Two subpackages each allowed the other would still be refused as a cycle.
    loose = {**rules, "job": {**rules["job"], "may": {"store"}}}
    both = {**g, "job.spec": g["job.spec"] | {"store.runs"}}
    assert any(v.startswith("package cycle") for v in architecture.violations(both, loose))


def test_a_function_level_import_counts(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from rayganx.training import loop\n")
    assert "rayganx.training.loop" in architecture.imports(f)


def test_the_cycle_check_finds_a_cycle():
    assert architecture.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_every_module_is_in_the_table_and_none_is_long():
    text = (ROOT / "docs" / "architecture.md").read_text()
    names = set(re.findall(r"`([a-z_]+/[a-z0-9_]+)`", text))
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if path.stem not in ("__init__", "__main__") and rel.parts[0] != "cli":
            assert f"{rel.parts[0]}/{path.stem}" in names, f"docs/architecture.md: no row for rayganx/{rel}"
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"rayganx/{rel} is over {MAX_LINES} lines"


def test_no_module_and_no_docs_script_imports_the_package_s_private_names():
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "docs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rayganx"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"
