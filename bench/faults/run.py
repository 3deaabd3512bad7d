#!/usr/bin/env python3
"""Run the fault matrix (tests/faults, one test per row of docs/failure-modes.md) and
print fault / expected / observed / requests lost per row.

    .venv/bin/python bench/faults/run.py [--rows 1,8,11] [--write-readme] [-- PYTEST ARGS]

Each row's test reports what it observed through the `fault_report` fixture
(tests/faults/conftest.py) into a JSON-lines file; a row whose test failed, was
skipped or reported nothing is shown as such. Writes bench/out/faults.json and
bench/out/faults.md; --write-readme also replaces the "Faults" section of
bench/README.md. Exit status 1 unless every selected row passed as documented.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "failure-modes.md"
OUT = REPO / "bench" / "out"
README = REPO / "bench" / "README.md"
PYTEST = str(Path(sys.executable).parent / "pytest")
SECTION = "## Faults"


def doc_rows(text: str) -> dict[int, dict[str, str]]:
    """The matrix of docs/failure-modes.md: row number -> its cells by column name."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip().lower() for c in lines[0].strip("|").split("|")]
    rows: dict[int, dict[str, str]] = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header) or not cells[0].isdigit():
            continue
        rows[int(cells[0])] = dict(zip(header, cells))
    return rows


def row_tests(cells: dict[str, str]) -> list[str]:
    """The test node ids named in a row's `test` cell (one or more, in backticks)."""
    return re.findall(r"`([^`]+)`", cells["test"])


def run_rows(rows: list[int], extra: list[str]) -> tuple[dict[int, list[dict[str, Any]]],
                                                        dict[str, str], float]:
    doc = doc_rows(DOC.read_text())
    tests = [t for r in rows for t in row_tests(doc[r])]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        junit = Path(tmp) / "junit.xml"
        t0 = time.monotonic()
        subprocess.run([PYTEST, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                        *tests, *extra], cwd=REPO, check=False,
                       env=dict(os.environ, PD_FAULT_REPORT=str(report)))
        wall = time.monotonic() - t0
        seen: dict[int, list[dict[str, Any]]] = {}
        if report.exists():
            for line in report.read_text().splitlines():
                item = json.loads(line)
                seen.setdefault(item["row"], []).append(item)
        outcome = junit_outcomes(junit.read_text() if junit.exists() else "")
    return seen, outcome, wall


def junit_outcomes(xml: str) -> dict[str, str]:
    """test name -> passed / failed / skipped, from pytest's junit XML."""
    import xml.etree.ElementTree as ET  # noqa: N817 (stdlib idiom)

    if not xml:
        return {}
    out: dict[str, str] = {}
    for case in ET.fromstring(xml).iter("testcase"):
        name = case.get("name", "").split("[")[0]    # parametrized: the worst case
        kinds = {child.tag for child in case}
        state = ("failed" if kinds & {"failure", "error"} else
                 "skipped" if "skipped" in kinds else "passed")
        if out.get(name, "passed") == "passed":
            out[name] = state
    return out


def table(rows: list[int], seen: dict[int, list[dict[str, Any]]],
          outcome: dict[str, str]) -> tuple[str, int]:
    doc = doc_rows(DOC.read_text())
    out = ["| # | fault | expected | observed | requests lost | result |",
           "|---:|---|---|---|---:|---|"]
    ok = 0
    for r in rows:
        cells = doc[r]
        states = [outcome.get(t.split("::")[-1], "not run") for t in row_tests(cells)]
        status = next((x for x in states if x != "passed"), "passed")
        reports = seen.get(r, [])
        observed = " / ".join(x["observed"] for x in reports) or "(no report)"
        losts = [x["lost"] for x in reports if x["lost"] is not None]
        lost = str(sum(losts)) if losts else "n/a"
        good = status == "passed" and bool(reports)
        ok += good
        out.append(f"| {r} | {cells['fault']} | {cells['what the user sees']} | "
                   f"{observed.replace('|', '/')} | {lost} | "
                   f"{'as documented' if good else status} |")
    return "\n".join(out), ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="", help="comma-separated row numbers (default: all)")
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    doc = doc_rows(DOC.read_text())
    rows = sorted(int(x) for x in args.rows.split(",") if x) or sorted(doc)
    unknown = [r for r in rows if r not in doc]
    if unknown:
        ap.error(f"rows not in {DOC.relative_to(REPO)}: {unknown}")
    seen, outcome, wall = run_rows(rows, args.pytest_args)
    text, ok = table(rows, seen, outcome)
    stamp = time.strftime("%Y-%m-%d")
    head = (f"`bench/faults/run.py`, {len(rows)} rows, {ok}/{len(rows)} as documented, "
            f"{wall:.0f} s wall; {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}; {stamp}.")
    md = f"{head}\n\n{text}\n"
    print(md)
    OUT.mkdir(exist_ok=True)
    (OUT / "faults.md").write_text(md)
    (OUT / "faults.json").write_text(json.dumps(
        {"rows": rows, "ok": ok, "wall_s": round(wall, 1), "date": stamp,
         "reports": {str(k): v for k, v in seen.items()}, "outcome": outcome}, indent=1) + "\n")
    if args.write_readme:
        write_readme(md)
    return 0 if ok == len(rows) else 1


def write_readme(md: str) -> None:
    text = README.read_text()
    body = (f"{SECTION}\n\nThe fault matrix of docs/failure-modes.md, one test per row "
            f"(tests/faults), each reporting what it observed.\n\n{md}")
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: body + "\n", text) if pattern.search(text) \
        else text.rstrip("\n") + "\n\n" + body
    README.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
