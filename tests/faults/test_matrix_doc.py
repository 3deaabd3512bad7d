"""docs/failure-modes.md and tests/faults agree: every row names its test, that test
exists and is marked with the row, and no marked test is missing from the table."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_faults_run",
                                               REPO / "bench" / "faults" / "run.py")
assert _spec and _spec.loader
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
doc_rows = _bench.doc_rows
row_tests = _bench.row_tests

DOC = REPO / "docs" / "failure-modes.md"
COLUMNS = ["#", "fault", "what the user sees", "what is left running", "how to recover",
           "test"]


def _row_of(node: ast.expr) -> int | None:
    """N of a `pytest.mark.fault_row(N)` expression, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "fault_row" and node.args
            and isinstance(node.args[0], ast.Constant)):
        return int(node.args[0].value)
    return None


def marked_tests() -> dict[str, int]:
    """'tests/faults/FILE.py::test_x' -> row, for every test marked fault_row."""
    found: dict[str, int] = {}
    for path in sorted((REPO / "tests" / "faults").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_row = None
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "pytestmark" for t in stmt.targets):
                values = stmt.value.elts if isinstance(stmt.value, ast.List) else [stmt.value]
                rows = [r for r in map(_row_of, values) if r is not None]
                module_row = rows[0] if rows else None
        for stmt in tree.body:
            if isinstance(stmt, ast.FunctionDef) and stmt.name.startswith("test_"):
                rows = [r for r in map(_row_of, stmt.decorator_list) if r is not None]
                row = rows[0] if rows else module_row
                if row is not None:
                    found[f"{path.relative_to(REPO)}::{stmt.name}"] = row
    return found


def test_every_row_names_a_marked_test_and_every_marked_test_is_a_row():
    text = DOC.read_text()
    header = [c.strip().lower() for c in
              next(ln for ln in text.splitlines() if ln.startswith("|")).strip("|").split("|")]
    assert header == COLUMNS
    rows = doc_rows(text)
    assert sorted(rows) == list(range(1, 15)), "rows 1-14, each once"
    marked = marked_tests()
    problems = []
    for n, cells in rows.items():
        for col in COLUMNS[1:]:
            if not cells[col]:
                problems.append(f"row {n}: empty '{col}'")
        tests = row_tests(cells)
        if not tests:
            problems.append(f"row {n}: no test named")
        for test in tests:
            if marked.get(test) != n:
                problems.append(f"row {n}: {test} is not a test marked fault_row({n})")
    documented = {t for cells in rows.values() for t in row_tests(cells)}
    problems += [f"{t} (fault_row({r})) is not in the table"
                 for t, r in marked.items() if t not in documented]
    assert not problems, "\n".join(problems)


def test_readme_links_the_matrix():
    assert "docs/failure-modes.md" in (REPO / "README.md").read_text()
