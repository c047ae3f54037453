"""Drain timing: how fast a replica with N active runs stops, and whether every run
is finalized.

For each N (default 100 and 1000) and each way a pod is stopped, a fresh
``quiesce serve`` (QUIESCE_SHUTDOWN_GRACE_SECONDS=2) on a redis-server of this
script's own gets N long ``sleep`` runs (600 s: they outlive the grace) and a few
short ones (1 s: they finish inside it), then:

* ``sigterm`` — SIGTERM to Granian's main process (a pod without a preStop hook);
* ``prestop`` — ``quiesce drain --timeout 10`` (the preStop hook), then SIGTERM as
  soon as it returns (what the kubelet does).

Measured from the server's own drain start (the time of its ``drain_triggered`` log
line): when ``/readyz`` first answers 503 (and whether a probe was refused before
it), when the grace ended, whether finalization had to be forced, when the drain
finished, when the hook returned, when the process exited and its exit code. Then
every run is read back from Redis: the long ones must be ``failed``/``shutdown``, the short ones
``succeeded``, none ``running``. The contract: exit 0 within grace + 2 s of the
drain's start, every run finalized.

Usage: .venv/bin/python bench/drain_timing.py [--runs 100 1000 5000] [--paths sigterm prestop]
       [--repeat 3] [--keep-logs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import httpx
import msgspec
import redis
from support import BIN, Processes, Started, base_env

from service.schemas import record_decoder
from service.store.redis import run_key

GRACE_SECONDS = 2.0
CONTRACT_SLACK_SECONDS = 2.0
LONG_SECONDS = 600
SHORT_SECONDS = 1.0
SHORT_RUNS = 5
HOOK_TIMEOUT_SECONDS = 10
CREATE_CONCURRENCY = 32
#: Log events whose first occurrence times the drain's phases.
PHASES = ("drain_triggered", "drain_cancelling", "drain_forcing_finalization", "drain_finished")
COUNTED_EVENTS = frozenset(
    {"drain_forcing_finalization", "run_left_running", "task_ignored_cancellation",
     "finalize_retrying"}
)  # fmt: skip


@dataclass
class Outcome:
    n: int
    path: str
    active_at_drain: int | None = None
    ready_503_s: float | None = None
    refused_before_503: int = 0
    hook_s: float | None = None
    hook_rc: int | None = None
    exit_s: float | None = None
    exit_after_sigterm_s: float | None = None
    exit_code: int | None = None
    long_statuses: Counter[str] = field(default_factory=Counter)
    short_statuses: Counter[str] = field(default_factory=Counter)
    log_events: Counter[str] = field(default_factory=Counter)
    forced: int | None = None
    #: Seconds from t0 (signal sent / hook started) to the server's own drain start.
    drain_start_s: float | None = None
    #: Phases from the server's log, in seconds after its drain start.
    phases: dict[str, float] = field(default_factory=dict)
    shutdown_finished_logged: int = 0
    note: str = ""

    def from_drain(self, seconds: float | None) -> float | None:
        """A time measured from t0, re-based on the server's drain start."""
        if seconds is None or self.drain_start_s is None:
            return None
        return seconds - self.drain_start_s

    @property
    def finalized(self) -> bool:
        return (
            self.long_statuses.get("failed/shutdown", 0) == self.n
            and self.short_statuses.get("succeeded", 0) == SHORT_RUNS
        )

    @property
    def within_contract(self) -> bool:
        return (
            self.exit_code == 0
            and (exit_s := self.from_drain(self.exit_s)) is not None
            and exit_s <= GRACE_SECONDS + CONTRACT_SLACK_SECONDS
            and self.finalized
        )


# --- creating runs ----------------------------------------------------------------


async def _create_runs(url: str, seconds: float, count: int) -> list[str]:
    body = msgspec.json.encode({"task": "sleep", "input": {"seconds": seconds}})
    ids: list[str] = []
    todo = iter(range(count))
    limits = httpx.Limits(max_connections=CREATE_CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker() -> None:
            for _ in todo:
                response = await client.post(
                    "/v1/runs", content=body, headers={"content-type": "application/json"}
                )
                if response.status_code != 202:
                    raise RuntimeError(f"create answered {response.status_code}: {response.text}")
                ids.append(response.json()["run_id"])

        await asyncio.gather(*(worker() for _ in range(CREATE_CONCURRENCY)))
    return ids


def create_runs(url: str, seconds: float, count: int) -> list[str]:
    return asyncio.run(_create_runs(url, seconds, count))


# --- watching readiness -----------------------------------------------------------


class ReadinessWatch(threading.Thread):
    """Polls /readyz from ``start_at`` on; records the first 503 and any refusal before it."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self._url = f"{url}/readyz"
        self.t0 = 0.0
        self.first_503: float | None = None
        self.refused = 0
        self._halt = threading.Event()
        self._go = threading.Event()

    def begin(self, t0: float) -> None:
        self.t0 = t0
        self._go.set()

    def stop(self) -> None:
        self._halt.set()
        self._go.set()

    def run(self) -> None:
        self._go.wait()
        # A new connection per probe, as the kubelet makes.
        while not self._halt.is_set() and self.first_503 is None:
            try:
                status = httpx.get(self._url, timeout=1.0).status_code
            except httpx.TimeoutException:
                status = None
            except httpx.HTTPError:
                self.refused += 1
                status = None
            if status == 503:
                self.first_503 = time.monotonic() - self.t0
                return
            time.sleep(0.005)


# --- one case ---------------------------------------------------------------------


def run_case(procs: Processes, redis_server: Started, n: int, path: str) -> Outcome:
    outcome = Outcome(n=n, path=path)
    redis_url = f"redis://127.0.0.1:{redis_server.port}/0"
    server = procs.quiesce(
        f"quiesce-{path}-{n}",
        {
            "QUIESCE_REDIS_URL": redis_url,
            "QUIESCE_SHUTDOWN_GRACE_SECONDS": f"{GRACE_SECONDS:g}",
            "QUIESCE_MAX_ACTIVE_RUNS": "100000",
        },
    )
    try:
        long_ids = create_runs(server.url, LONG_SECONDS, n)
        short_ids = create_runs(server.url, SHORT_SECONDS, SHORT_RUNS)
        state = httpx.get(f"{server.url}/admin/state", timeout=10).json()
        outcome.active_at_drain = state["active_count"]

        watch = ReadinessWatch(server.url)
        watch.start()
        t0 = time.monotonic()
        t0_wall = time.time()
        watch.begin(t0)
        if path == "sigterm":
            server.process.send_signal(signal.SIGTERM)
            sigterm_at = t0
        else:
            env = {**base_env(), "PORT": str(server.port),
                   "QUIESCE_SHUTDOWN_GRACE_SECONDS": f"{GRACE_SECONDS:g}"}  # fmt: skip
            hook = subprocess.run(
                [str(BIN / "quiesce"), "drain", "--timeout", str(HOOK_TIMEOUT_SECONDS)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            sigterm_at = time.monotonic()
            outcome.hook_s = sigterm_at - t0
            outcome.hook_rc = hook.returncode
            if hook.returncode != 0:
                outcome.note = (hook.stdout + hook.stderr).strip().splitlines()[-1][:120]
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        try:
            outcome.exit_code = server.process.wait(timeout=60)
            exited = time.monotonic()
            outcome.exit_s = exited - t0
            outcome.exit_after_sigterm_s = exited - sigterm_at
        except subprocess.TimeoutExpired:
            outcome.note = "did not exit within 60 s"
        watch.stop()
        watch.join(5)
        outcome.ready_503_s = watch.first_503
        outcome.refused_before_503 = watch.refused
        verify(redis_url, long_ids, short_ids, outcome)
        read_log(server, outcome, t0_wall)
    finally:
        procs.stop(server)
    return outcome


def verify(redis_url: str, long_ids: list[str], short_ids: list[str], outcome: Outcome) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        groups = ((long_ids, outcome.long_statuses), (short_ids, outcome.short_statuses))
        for ids, counter in groups:
            pipe = client.pipeline(transaction=False)
            for run_id in ids:
                pipe.hmget(run_key(run_id), "status", "record")
            for status, raw in pipe.execute():
                if raw is None:
                    counter["missing"] += 1
                    continue
                record = record_decoder.decode(raw)
                reason = f"/{record.error.reason}" if record.error is not None else ""
                if status is not None and status.decode() != record.status:
                    counter[f"hash:{status.decode()}≠record:{record.status}"] += 1
                counter[f"{record.status}{reason}"] += 1
    finally:
        client.close()


def read_log(server: Started, outcome: Outcome, t0_wall: float) -> None:
    """Count the drain's log events and time its phases from the server's drain start."""
    stamps: dict[str, float] = {}
    for line in server.log().splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        event = entry.get("event")
        if event in PHASES and event not in stamps and "timestamp" in entry:
            stamps[event] = datetime.fromisoformat(entry["timestamp"]).timestamp()
        if event in COUNTED_EVENTS:
            outcome.log_events[event] += 1
        if event == "drain_forcing_finalization":
            outcome.forced = entry.get("runs")
        if event == "run_finished" and entry.get("reason") == "shutdown":
            outcome.shutdown_finished_logged += 1
    start = stamps.get("drain_triggered")
    if start is None:
        return
    outcome.drain_start_s = start - t0_wall
    outcome.phases = {event: stamp - start for event, stamp in stamps.items()}


# --- report -----------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def report(outcomes: list[Outcome]) -> None:
    print()
    print(
        f"Drain, QUIESCE_SHUTDOWN_GRACE_SECONDS={GRACE_SECONDS:g}: N long runs ({LONG_SECONDS} s) "
        f"+ {SHORT_RUNS} short ({SHORT_SECONDS:g} s). Seconds from the server's drain start "
        "(its drain_triggered log line)"
    )
    header = (
        f"{'N':>5} {'path':<8} {'active':>6} {'503 at':>7} {'refused':>7} {'hook (rc)':>10} "
        f"{'cancel':>6} {'forced':>6} {'drained':>7} {'exit':>11} {'rc':>3} "
        f"{'failed/shutdown':>15} {'left':>5} {'short ok':>8} {'logged':>6} {'contract':>8}"
    )
    print(header)
    print("-" * len(header))
    for o in outcomes:
        hook = "-" if o.hook_s is None else f"{fmt(o.from_drain(o.hook_s))} ({o.hook_rc})"
        exit_s = o.from_drain(o.exit_s)
        exit_ = "-" if exit_s is None else f"grace+{exit_s - GRACE_SECONDS:.2f}"
        shutdown = o.long_statuses.get("failed/shutdown", 0)
        short_ok = o.short_statuses.get("succeeded", 0)
        print(
            f"{o.n:>5} {o.path:<8} {fmt(o.active_at_drain, 'd'):>6} "
            f"{fmt(o.from_drain(o.ready_503_s), '.3f'):>7} {o.refused_before_503:>7} {hook:>10} "
            f"{fmt(o.phases.get('drain_cancelling')):>6} "
            f"{fmt(o.phases.get('drain_forcing_finalization')):>6} "
            f"{fmt(o.phases.get('drain_finished')):>7} {exit_:>11} {fmt(o.exit_code, 'd'):>3} "
            f"{f'{shutdown}/{o.n}':>15} {o.n - shutdown:>5} {f'{short_ok}/{SHORT_RUNS}':>8} "
            f"{o.shutdown_finished_logged:>6} {'ok' if o.within_contract else 'MISSED':>8}"
        )
    print(
        "503 at: first /readyz 503 (new connection per probe); refused: probes refused before it; "
        "hook: `quiesce drain` returned; cancel: grace over, leftovers cancelled; forced: "
        "supervisors gave up, writes forced; drained: drain finished; exit: process exit; "
        "left: long runs not failed/shutdown in Redis; logged: run_finished lines with reason "
        "shutdown; contract: exit 0 within grace + 2 s and every run finalized"
    )
    print()
    for o in outcomes:
        details = []
        if o.path == "prestop" and o.drain_start_s is not None:
            details.append(f"hook started {o.drain_start_s:.2f} s before the drain did")
        if o.path == "sigterm" and o.drain_start_s is not None:
            details.append(f"drain started {o.drain_start_s:.3f} s after SIGTERM")
        if o.exit_after_sigterm_s is not None:
            details.append(f"exit {o.exit_after_sigterm_s:.2f} s after SIGTERM")
        if set(o.long_statuses) - {"failed/shutdown"}:
            details.append(f"long runs: {dict(o.long_statuses)}")
        if set(o.short_statuses) - {"succeeded"}:
            details.append(f"short runs: {dict(o.short_statuses)}")
        if o.log_events:
            details.append(f"log: {dict(o.log_events)}")
        if o.note:
            details.append(o.note)
        print(f"N={o.n} {o.path}: " + "; ".join(details))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--paths", nargs="+", default=["sigterm", "prestop"],
                        choices=["sigterm", "prestop"])  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="cases per N and path")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args()
    outcomes = []
    with Processes(keep_logs=args.keep_logs) as procs:
        redis_server = procs.redis_server()
        cases = [(n, path) for n in args.runs for _ in range(args.repeat) for path in args.paths]
        for n, path in cases:
            outcome = run_case(procs, redis_server, n, path)
            outcomes.append(outcome)
            print(
                f"N={n} {path}: exit {fmt(outcome.from_drain(outcome.exit_s))} s after the "
                f"drain start, rc={outcome.exit_code}, long runs {dict(outcome.long_statuses)}",
                flush=True,
            )
        report(outcomes)
        if args.keep_logs:
            print(f"logs in {procs.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
