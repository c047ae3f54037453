"""Event throughput: runs emitting progress events as fast as they can, against the
client limit measured in the same run.

The subject: ``quiesce serve`` on its own ``redis-server``, with the ``perf_emit``
task (``bench/perf_tasks.py``), which calls ``ctx.emit`` in a loop. Its rate is the
events written divided by the time from the first run's ``created_at`` (the 202)
to the last run's ``finished_at`` (the server's clock; the terminal write follows the last
progress event), so only the creates' own answer time is counted.

The reference: redis-py (with hiredis, when installed: the column says which
parser it used) in this process, pipelining ``XADD key MAXLEN ~ 10000 * event
<the same event JSON>`` in batches of 1,000 to the same Redis, the payloads encoded
beforehand — the most a Python client makes of the same writes. It is measured right
before each subject case, as the best of three rounds.

Afterwards every run is read back: its progress events must be ``i`` = 1, 2, … in
order (those a run keeps: its newest 10,000), the terminal event last, nothing after it.

Usage: .venv/bin/python bench/perf_events.py [--smoke] [--keep-logs]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime

import httpx
import msgspec
import redis
from perf_table import Options, Row, options_from, render, section_parser
from support import BENCH_DIR, Processes, Started

from service.schemas import Event, RunProgress, event_decoder, event_type, record_decoder
from service.store.base import MAX_EVENTS_PER_RUN
from service.store.redis import events_key, run_key

BATCH = 1_000
TERMINAL = frozenset({"run_succeeded", "run_failed", "run_cancelled"})


@dataclass
class Case:
    runs: int
    events_per_run: int
    seconds: float
    ordered: bool
    note: str = ""

    @property
    def rate(self) -> float:
        return self.runs * self.events_per_run / self.seconds if self.seconds > 0 else 0.0


def parser_name() -> str:
    from redis.utils import HIREDIS_AVAILABLE

    return "hiredis" if HIREDIS_AVAILABLE else "pure-Python parser"


def reference_rate(port: int, streams: int, total: int, rounds: int = 3) -> float:
    """Events/s of pipelined XADDs (batches of BATCH) over ``streams`` streams: the
    best of ``rounds`` rounds of ``total / rounds`` events (the limit, not the noise)."""
    client = redis.Redis(port=port)
    per_round = max(total // rounds, BATCH)
    try:
        keys = [f"bench:reference:{time.monotonic_ns()}:{n}" for n in range(streams)]
        payloads = [
            msgspec.json.encode(RunProgress(created_at=datetime.now(), data={"i": i}))
            for i in range(1, per_round + 1)
        ]
        best = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            for offset in range(0, per_round, BATCH):
                pipe = client.pipeline(transaction=False)
                for i in range(offset, min(offset + BATCH, per_round)):
                    pipe.xadd(
                        keys[i % streams],
                        {"event": payloads[i]},
                        maxlen=MAX_EVENTS_PER_RUN,
                        approximate=True,
                    )
                pipe.execute()
            best = max(best, per_round / (time.perf_counter() - started))
        client.delete(*keys)
    finally:
        client.close()
    return best


async def _create(url: str, runs: int, events: int) -> list[str]:
    body = msgspec.json.encode({"task": "perf_emit", "input": {"events": events}})
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/runs", content=body, headers=headers) for _ in range(runs))
        )
    for response in responses:
        if response.status_code != 202:
            raise RuntimeError(f"create answered {response.status_code}: {response.text}")
    return [response.json()["run_id"] for response in responses]


def subject_case(server: Started, port: int, runs: int, events: int, timeout: float) -> Case:
    ids = asyncio.run(_create(server.url, runs, events))
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + timeout
        while True:
            pipe = client.pipeline(transaction=False)
            for run_id in ids:
                pipe.hget(run_key(run_id), "status")
            statuses = pipe.execute()
            if all(status not in (None, b"running") for status in statuses):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"runs still running after {timeout:g} s")
            time.sleep(0.02)
        first_start: datetime | None = None
        last_finish: datetime | None = None
        ordered = True
        notes: list[str] = []
        for run_id in ids:
            record = record_decoder.decode(client.hget(run_key(run_id), "record"))
            if record.status != "succeeded":
                ordered = False
                notes.append(f"{run_id}: {record.status} {record.error}")
                continue
            entries = client.xrange(events_key(run_id))
            decoded = [event_decoder.decode(fields[b"event"]) for _, fields in entries]
            if first_start is None or record.created_at < first_start:
                first_start = record.created_at
            assert record.finished_at is not None
            if last_finish is None or record.finished_at > last_finish:
                last_finish = record.finished_at
            problem = _check_order(decoded, events)
            if problem:
                ordered = False
                notes.append(f"{run_id}: {problem}")
        if first_start is None or last_finish is None:
            raise RuntimeError("no run succeeded: " + "; ".join(notes[:3]))
        seconds = (last_finish - first_start).total_seconds()
        return Case(runs, events, seconds, ordered, "; ".join(notes[:3]))
    finally:
        client.close()


def _check_order(decoded: list[Event], events: int) -> str:
    """'' when the progress events are 1..events in order (their newest ones) and the
    terminal event is last; else what is wrong."""
    types = [event_type(event) for event in decoded]
    terminal = [n for n, kind in enumerate(types) if kind in TERMINAL]
    if terminal != [len(types) - 1]:
        return f"terminal events at {terminal} of {len(types)}"
    numbers = [event.data["i"] for event in decoded if isinstance(event, RunProgress)]
    expected_tail = list(range(events - len(numbers) + 1, events + 1))
    if numbers != expected_tail:
        return "progress events out of order or missing"
    if len(numbers) < min(events, MAX_EVENTS_PER_RUN - 2):
        return f"only {len(numbers)} progress events kept"
    return ""


def run(options: Options) -> list[Row]:
    if options.smoke:
        one, many, per_run = 3_000, 100, 50
    else:
        one, many, per_run = 300_000, 100, 5_000
    rows: list[Row] = []
    with Processes(keep_logs=options.keep_logs) as procs:
        redis_server = procs.redis_server()
        assert redis_server.port is not None
        pythonpath = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p)
        server = procs.quiesce(
            "quiesce-events",
            {
                "QUIESCE_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0",
                "QUIESCE_TASK_MODULES": "perf_tasks",
                "QUIESCE_MAX_ACTIVE_RUNS": "1000",
                "PYTHONPATH": pythonpath,
            },
        )
        # Warm-up: connections, scripts, the first run.
        subject_case(server, redis_server.port, 1, 100, 30)
        reference_rate(redis_server.port, 1, 2 * BATCH)
        parser = parser_name()
        for goal, runs, events, target in (
            ("events, 1 run", 1, one, 0.50),
            (f"events, {many} runs", many, per_run, 0.80),
        ):
            reference = reference_rate(redis_server.port, runs, runs * events)
            case = subject_case(server, redis_server.port, runs, events, 600)
            ratio = case.rate / reference
            measured = (
                f"{case.rate:,.0f} events/s ({runs * events:,} events in {case.seconds:.2f} s)"
            )
            if not case.ordered:
                measured += f"; **order broken**: {case.note}"
            rows.append(
                Row(
                    goal=goal,
                    measured=measured,
                    reference=f"redis-py ({parser}) pipelined XADD, batches of {BATCH:,}: "
                    f"{reference:,.0f}/s",
                    ratio=ratio,
                    target=f"≥ {target:.2f}",
                    met=None if options.smoke else (ratio >= target and case.ordered),
                )
            )
        if options.keep_logs:
            print(f"logs in {procs.workdir}", file=sys.stderr)
    return rows


def main() -> int:
    args = section_parser(__doc__, "seconds, not a measurement").parse_args()
    print(render(run(options_from(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
