"""Orphan exit: how long a worker outlives Granian's main process, and whether its
runs are finalized.

For each N (default 10 and 500), a fresh ``quiesce serve`` (grace 25 s, so only the
orphan's own bounded drain can explain a quick exit) on a redis-server of this
script's own gets N long ``sleep`` runs; then Granian's main process alone is
SIGKILLed (what an OOM kill outside a container does). Measured from that kill:
when the worker was first seen gone (polled every 5 ms in /proc), and how every run
reads in Redis afterwards (``failed/shutdown`` expected, none ``running``). The
service's bound: gone within 2 s of the death.

Usage: .venv/bin/python bench/orphan_exit.py [--runs 10 500] [--repeat 3] [--keep-logs]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import time
from collections import Counter

import redis
from drain_timing import create_runs
from support import Processes, Started

from service.schemas import record_decoder
from service.store.redis import run_key

LONG_SECONDS = 600
BOUND_SECONDS = 2.0


def worker_pid(server: Started) -> int:
    for line in server.log().splitlines():
        match = re.search(r"Spawning worker-\d+ with PID: (\d+)", line)
        if match:
            return int(match.group(1))
    raise RuntimeError(f"no worker PID in the log\n{server.log()[-2000:]}")


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def statuses(redis_url: str, run_ids: list[str]) -> Counter[str]:
    counter: Counter[str] = Counter()
    client = redis.Redis.from_url(redis_url)
    try:
        pipe = client.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hget(run_key(run_id), "record")
        for raw in pipe.execute():
            if raw is None:
                counter["missing"] += 1
                continue
            record = record_decoder.decode(raw)
            reason = f"/{record.error.reason}" if record.error is not None else ""
            counter[f"{record.status}{reason}"] += 1
    finally:
        client.close()
    return counter


def run_case(procs: Processes, redis_server: Started, n: int) -> tuple[float | None, Counter[str]]:
    redis_url = f"redis://127.0.0.1:{redis_server.port}/0"
    server = procs.quiesce(
        f"quiesce-orphan-{n}-{time.monotonic_ns()}",
        {"QUIESCE_REDIS_URL": redis_url, "QUIESCE_MAX_ACTIVE_RUNS": "100000"},
    )
    try:
        pid = worker_pid(server)
        run_ids = create_runs(server.url, LONG_SECONDS, n)
        killed = time.monotonic()
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        gone: float | None = None
        while time.monotonic() - killed < 10:
            if not running(pid):
                gone = time.monotonic() - killed
                break
            time.sleep(0.005)
        time.sleep(0.2)  # nothing more is written after the exit; let Redis settle
        return gone, statuses(redis_url, run_ids)
    finally:
        procs.stop(server)  # the whole group: a worker still alive is killed here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[10, 500])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    with Processes(keep_logs=args.keep_logs) as procs:
        redis_server = procs.redis_server()
        print(f"{'runs':>6} {'try':>4} {'worker gone after':>18}  statuses in Redis")
        for n in args.runs:
            for attempt in range(1, args.repeat + 1):
                gone, counts = run_case(procs, redis_server, n)
                shown = "not within 10 s" if gone is None else f"{gone:.3f} s"
                flag = "" if gone is not None and gone <= BOUND_SECONDS else "  OVER THE BOUND"
                print(f"{n:>6} {attempt:>4} {shown:>18}  {dict(counts)}{flag}")
        if args.keep_logs:
            print(f"logs: {procs.workdir}")


if __name__ == "__main__":
    main()
