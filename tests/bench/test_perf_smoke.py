"""``bench/perf.py --smoke`` runs every section present and prints the table, so the
performance bench cannot rot. Nothing is timed: the rows are not judged in a smoke
run, only their presence is checked."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, require_tool

BENCH = REPO / "bench"
HEADER = "| goal | measured | reference | ratio | target | met |"
#: The goals of issue 9 each section answers, one row each (at least).
GOALS = {
    "create": 2,  # 64 and 256 connections
    "peers": 2,  # FastAPI + redis-py, FastAPI → arq
    "events": 2,  # one run, 100 runs
    "fanout": 2,  # one run's 1,000 watchers, 1,000 runs' watchers
    "runs": 2,  # memory, drain
    "start": 1,  # cold start
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_perf_smoke_runs_every_section_and_prints_the_table() -> None:
    require_tool("wrk")
    require_tool("redis-server")
    done = subprocess.run(
        [sys.executable, "bench/perf.py", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    lines = done.stdout.splitlines()
    assert HEADER in lines, output
    table = lines[lines.index(HEADER) + 2 :]
    rows = [line for line in table if line.startswith("| ")]
    assert re.search(r"^Date: .* UTC; \d+ cores$", done.stdout, re.MULTILINE), output
    assert re.search(r"^Command: .*bench/perf\.py --smoke$", done.stdout, re.MULTILINE), output

    present = [name for name in GOALS if (BENCH / f"perf_{name}.py").is_file()]
    assert "create" in present
    for name in present:
        match = re.search(rf"^section {name}: (\d+) rows? in", done.stdout, re.MULTILINE)
        assert match, f"section {name} did not report its rows\n{output}"
        assert int(match.group(1)) >= GOALS[name], output
    assert len(rows) >= sum(GOALS[name] for name in present), output
    for goal in ("create, 64 conns", "create, 256 conns"):
        assert any(row.startswith(f"| {goal} |") for row in rows), output
    if "peers" in present:
        for goal in ("vs FastAPI + redis-py", "vs FastAPI → arq"):
            assert any(row.startswith(f"| {goal}") for row in rows), output
