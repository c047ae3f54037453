"""Active runs: what 10,000 of them cost in memory on one replica, and how soon a drain
finalizes 1,000 after its grace.

Memory: ``quiesce serve`` on its own ``redis-server`` (``QUIESCE_MAX_ACTIVE_RUNS``
above N) gets N ``sleep`` runs of 600 s, so all are active at once. The RSS of the
replica — Granian's main process and its worker, from ``/proc`` — is read once it is
ready (after a few short runs, so lazy imports and connections are counted in the
base) and again once ``/admin/state`` shows the N runs active; the per-run cost is
the difference divided by N.

Drain: ``drain_timing.py``'s SIGTERM case with 1,000 runs of 600 s
(``QUIESCE_SHUTDOWN_GRACE_SECONDS=2``): the time from the end of the grace to the
server's ``drain_finished`` log line, and every run read back ``failed``/``shutdown``.

Usage: .venv/bin/python bench/perf_runs.py [--smoke] [--keep-logs]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
from drain_timing import GRACE_SECONDS, create_runs, run_case
from perf_table import Options, Row, options_from, render, section_parser
from support import Processes, Started, _tree

MEMORY_TARGET_MB = 200
DRAIN_TARGET_SECONDS = 1.0


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def replica_rss(server: Started) -> tuple[int, int]:
    """The replica's RSS (every process of it) and its largest process's (the worker)."""
    sizes = [rss_bytes(pid) for pid in _tree(server.process.pid)]
    return sum(sizes), max(sizes)


def active_count(server: Started) -> int:
    count: int = httpx.get(f"{server.url}/admin/state", timeout=10).json()["active_count"]
    return count


def memory_row(procs: Processes, redis_server: Started, n: int, smoke: bool) -> Row:
    server = procs.quiesce(
        f"quiesce-memory-{n}",
        {
            "QUIESCE_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0",
            "QUIESCE_MAX_ACTIVE_RUNS": str(n + 100),
            "QUIESCE_SHUTDOWN_GRACE_SECONDS": "0",
        },
    )
    try:
        create_runs(server.url, 0.01, 50)  # warm-up: imports, connections, first runs
        deadline = time.monotonic() + 30
        while active_count(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        before, worker_before = replica_rss(server)
        create_runs(server.url, 600, n)
        while active_count(server) < n and time.monotonic() < deadline + 60:
            time.sleep(0.1)
        active = active_count(server)
        time.sleep(1.0)
        after, worker_after = replica_rss(server)
    finally:
        procs.stop(server)
    per_run = (after - before) / max(active, 1)
    mb = after / 1e6
    return Row(
        goal=f"memory, {n:,} active runs",
        measured=f"{mb:.0f} MB RSS, the worker {worker_after / 1e6:.0f} MB "
        f"({per_run / 1000:.1f} KB/run; {active:,} active)",
        reference=f"replica ready, no run: {before / 1e6:.0f} MB, the worker "
        f"{worker_before / 1e6:.0f} MB",
        ratio=None,
        target=f"< {MEMORY_TARGET_MB} MB",
        met=None if smoke else (mb < MEMORY_TARGET_MB and active == n),
    )


def drain_row(procs: Processes, redis_server: Started, n: int, smoke: bool) -> Row:
    outcome = run_case(procs, redis_server, n, "sigterm")
    finished = outcome.phases.get("drain_finished")
    after_grace = None if finished is None else finished - GRACE_SECONDS
    exit_s = outcome.from_drain(outcome.exit_s)
    shutdown = outcome.long_statuses.get("failed/shutdown", 0)
    measured = (
        "no drain_finished line"
        if after_grace is None
        else f"{after_grace:.2f} s after the grace ({shutdown:,}/{n:,} failed/shutdown"
    )
    if after_grace is not None:
        measured += "" if exit_s is None else f", exit grace+{exit_s - GRACE_SECONDS:.2f} s"
        measured += f", rc {outcome.exit_code})"
    return Row(
        goal=f"drain, {n:,} runs",
        measured=measured,
        reference=f"grace {GRACE_SECONDS:g} s",
        ratio=None,
        target=f"< {DRAIN_TARGET_SECONDS:g} s",
        met=None
        if smoke
        else (
            after_grace is not None
            and after_grace < DRAIN_TARGET_SECONDS
            and outcome.finalized
            and outcome.exit_code == 0
        ),
    )


def run(options: Options) -> list[Row]:
    memory_runs, drain_runs = (500, 100) if options.smoke else (10_000, 1_000)
    with Processes(keep_logs=options.keep_logs) as procs:
        redis_server = procs.redis_server()
        rows = [
            memory_row(procs, redis_server, memory_runs, options.smoke),
            drain_row(procs, redis_server, drain_runs, options.smoke),
        ]
        if options.keep_logs:
            print(f"logs in {procs.workdir}", file=sys.stderr)
    return rows


def main() -> int:
    args = section_parser(__doc__, "seconds, not a measurement").parse_args()
    print(render(run(options_from(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
