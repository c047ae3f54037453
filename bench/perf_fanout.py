"""Fan-out: SSE watchers of Quiesce against a bare broadcast, read by the same client.

Two scenarios, each run on both servers one after the other in the same bench run:

* **1 run x N watchers** (N = 1,000): one run emits ``--rate`` events a second (10),
  every watcher streams that run;
* **N runs x 1 watcher**: N runs each emit ``--rate-many`` events a second (1, so
  N events a second in all), one watcher per run.

Quiesce is ``quiesce serve`` on the bench's own ``redis-server`` with the ``tick``
task (``perf_tasks.py``); the reference is ``broadcast_app.py`` (frames encoded once,
one queue per stream) under the same Granian command line. Both emit on the same
schedule, with the emit's Unix time in the event's data.

The client is one asyncio process with raw connections (HTTP/1.1, chunked, SSE
parsed by hand, JSON by msgspec). Per delivered event it takes receipt time minus
the emit time; p99 is over the events emitted inside the measurement window (after
a warm-up). The server's CPU (Granian's process tree, ``/proc``) over the window is
divided by the events the client received in it, whenever emitted (a server that
falls behind delivers fewer, each at its real cost). Redis's own CPU is shown apart
(the bare broadcast has none). The Redis connections the
Quiesce process holds are counted with ``CLIENT LIST`` during each window.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import redis
from perf_table import Options, Row, options_from, render, section_parser
from support import BENCH_DIR, REPO, Processes, Started

TARGET = 1.5


@dataclass(frozen=True)
class Shape:
    """One scenario: how many runs, watchers, events and how long."""

    name: str
    runs: int
    watchers: int
    rate: float  # events per second per run
    warmup: float
    window: float

    @property
    def ticks(self) -> int:
        return int((self.warmup + self.window + 1.0) * self.rate)


class _Data(msgspec.Struct):
    t: float = 0.0


class _Event(msgspec.Struct):
    data: _Data


_DECODE = msgspec.json.Decoder(_Event).decode


@dataclass
class Tally:
    """What the client saw in one scenario on one server."""

    window: tuple[float, float] = (0.0, 0.0)
    latencies: list[float] = field(default_factory=list)
    frames: int = 0
    progress: int = 0
    #: Events received inside the window (whenever emitted).
    received_in_window: int = 0
    ended: int = 0
    errors: list[str] = field(default_factory=list)
    refused: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Figures:
    p99: float
    p50: float
    cpu_per_event: float
    redis_cpu_per_event: float
    delivered: int
    expected: int
    redis_connections: int | None
    errors: int

    def describe(self) -> str:
        return f"p99 {self.p99 * 1000:,.0f} ms (p50 {self.p50 * 1000:,.0f} ms)"


async def watch(port: int, path: str, tally: Tally, opened: asyncio.Event) -> None:
    """One SSE reader: de-chunk, split frames, time every event."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    except OSError as exc:
        tally.errors.append(f"connect: {exc}")
        opened.set()
        return
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        if status != 200:
            tally.refused[status] = tally.refused.get(status, 0) + 1
            return
        chunked = b"transfer-encoding: chunked" in head.lower()
        raw = bytearray()
        sse = bytearray()
        size = -1  # the current chunk's size; -1: reading a size line
        start, end = tally.window
        first = True
        finished = False
        while not finished:
            data = await reader.read(1 << 16)
            if not data:
                return
            now = time.time()
            if chunked:
                raw += data
                while True:
                    if size < 0:
                        line_end = raw.find(b"\r\n")
                        if line_end < 0:
                            break
                        size = int(raw[:line_end].split(b";")[0], 16)
                        del raw[: line_end + 2]
                        if size == 0:  # the last chunk: parse what came before it
                            finished = True
                            break
                    if len(raw) < size + 2:
                        break
                    sse += raw[:size]
                    del raw[: size + 2]
                    size = -1
            else:
                sse += data
            while (frame_end := sse.find(b"\n\n")) >= 0:
                frame = bytes(sse[:frame_end])
                del sse[: frame_end + 2]
                if first:
                    first = False
                    opened.set()
                index = frame.find(b"\ndata: ")
                if index < 0:
                    continue
                tally.frames += 1
                if b"\nevent: run_progress\n" not in frame:
                    if b"\nevent: run_started\n" not in frame:
                        tally.ended += 1
                        return
                    continue
                tally.progress += 1
                if start <= now < end:
                    tally.received_in_window += 1
                t = _DECODE(frame[index + 7 :]).data.t
                if start <= t < end:
                    tally.latencies.append(now - t)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        tally.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        opened.set()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def open_watchers(port: int, paths: list[str], tally: Tally) -> list[asyncio.Task[None]]:
    """Open every stream (at most 100 connecting at once); return once all are open."""
    gate = asyncio.Semaphore(100)
    tasks = []

    async def one(path: str) -> None:
        opened = asyncio.Event()
        async with gate:
            task = asyncio.create_task(watch(port, path, tally, opened))
            tasks.append(task)
            await opened.wait()

    await asyncio.gather(*(one(path) for path in paths))
    return tasks


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def redis_clients(port: int | None) -> int:
    """Connections to the bench's redis-server, this one (CLIENT LIST's own) excluded."""
    client = redis.Redis(port=port)
    try:
        return len(client.client_list()) - 1
    finally:
        client.close()


async def measure(
    shape: Shape,
    server: Started,
    redis_server: Started,
    *,
    quiesce: bool,
) -> Figures:
    """Start the emitters, open the watchers, time one window; both servers alike."""
    tally = Tally()
    lead = 1.0 + shape.watchers / 250  # time to open every stream before the first tick
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        start_at = time.time() + lead + (shape.runs / 300 if quiesce else 0)
        if quiesce:
            channels = await create_runs(http, shape, start_at)
        else:
            channels = [f"c{k}" for k in range(shape.runs)]
        paths = [
            f"/v1/runs/{channels[k % shape.runs]}/events/stream" for k in range(shape.watchers)
        ]
        tally.window = (start_at + shape.warmup, start_at + shape.warmup + shape.window)
        opening = time.time()
        tasks = await open_watchers(server.port or 0, paths, tally)
        opened_in = time.time() - opening
        if not quiesce:
            await http.post(
                "/broadcast",
                json={
                    "channels": channels,
                    "rate": shape.rate,
                    "ticks": shape.ticks,
                    "start_at": start_at,
                },
            )
        if time.time() > start_at:
            print(f"  note: streams took {opened_in:.1f}s to open, after the first tick")
        await asyncio.sleep(max(0.0, tally.window[0] - time.time()))
        cpu0, redis0 = await asyncio.to_thread(cpu_now, server, redis_server)
        received0 = tally.received_in_window
        await asyncio.sleep(max(0.0, (tally.window[0] + tally.window[1]) / 2 - time.time()))
        connections = await asyncio.to_thread(redis_clients, redis_server.port) if quiesce else None
        await asyncio.sleep(max(0.0, tally.window[1] - time.time()))
        cpu1, redis1 = await asyncio.to_thread(cpu_now, server, redis_server)
        received = tally.received_in_window - received0
        _, pending = await asyncio.wait(tasks, timeout=shape.window + 60)
        for task in pending:
            task.cancel()
        if pending:
            tally.errors.append(f"{len(pending)} streams did not end")
            await asyncio.wait(pending)
    if tally.errors or tally.refused:
        print(f"  errors: {tally.errors[:5]}, refused: {tally.refused}", file=sys.stderr)
    return Figures(
        p99=quantile(tally.latencies, 0.99),
        p50=quantile(tally.latencies, 0.50),
        cpu_per_event=(cpu1 - cpu0) / received if received else float("nan"),
        redis_cpu_per_event=(redis1 - redis0) / received if received else float("nan"),
        delivered=tally.progress,
        expected=shape.ticks * shape.watchers,
        redis_connections=connections,
        errors=len(tally.errors) + sum(tally.refused.values()),
    )


async def create_runs(http: httpx.AsyncClient, shape: Shape, start_at: float) -> list[str]:
    """The ``tick`` runs of a scenario, their phases spread evenly (as independent runs'
    would be)."""
    gate = asyncio.Semaphore(32)

    async def create(k: int) -> str:
        body = {
            "task": "tick",
            "input": {
                "rate": shape.rate,
                "ticks": shape.ticks,
                "start_at": start_at + k / shape.runs / shape.rate,
            },
        }
        async with gate:
            response = await http.post("/v1/runs", json=body)
        response.raise_for_status()
        run_id: str = response.json()["run_id"]
        return run_id

    return list(await asyncio.gather(*(create(k) for k in range(shape.runs))))


async def emit_only(shape: Shape, server: Started) -> float:
    """Quiesce's CPU per event emitted by the same runs with nobody watching: the
    share of the durable append path in the fan-out figure."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        start_at = time.time() + 1.0 + shape.runs / 300
        await create_runs(http, shape, start_at)
        await asyncio.sleep(max(0.0, start_at + shape.warmup - time.time()))
        cpu0 = await asyncio.to_thread(server.cpu_seconds)
        await asyncio.sleep(shape.window)
        cpu1 = await asyncio.to_thread(server.cpu_seconds)
        await asyncio.sleep(max(0.0, start_at + shape.ticks / shape.rate + 1.0 - time.time()))
    return (cpu1 - cpu0) / (shape.runs * shape.rate * shape.window)


def cpu_now(server: Started, redis_server: Started) -> tuple[float, float]:
    return server.cpu_seconds(), redis_server.cpu_seconds()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def shapes(options: Options, watchers: int, rate: float, rate_many: float) -> list[Shape]:
    if options.smoke:
        watchers = min(watchers, 50)
        return [
            Shape(f"1 run x {watchers} watchers", 1, watchers, rate, 0.5, 1.5),
            Shape(
                f"{watchers} runs x 1 watcher", watchers, watchers, max(rate_many, 2.0), 0.5, 1.5
            ),
        ]
    return [
        Shape(f"{watchers:,} watchers x 1 run", 1, watchers, rate, 3.0, 10.0),
        Shape(
            f"{watchers:,} watchers x {watchers:,} runs", watchers, watchers, rate_many, 3.0, 10.0
        ),
    ]


def run(
    options: Options,
    *,
    watchers: int = 1000,
    rate: float = 10.0,
    rate_many: float = 1.0,
    only: str | None = None,
) -> list[Row]:
    raise_fd_limit()
    rows: list[Row] = []
    connection_counts: list[int] = []
    with Processes(keep_logs=options.keep_logs) as processes:
        redis_server = processes.redis_server()
        pythonpath = os.pathsep.join(
            [str(BENCH_DIR), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        bare = processes.granian_app("broadcast", "broadcast_app:create_app", BENCH_DIR)
        service = processes.quiesce(
            "quiesce",
            {
                "QUIESCE_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0",
                "QUIESCE_TASK_MODULES": "perf_tasks",
                "QUIESCE_MAX_ACTIVE_RUNS": str(max(100, 2 * watchers)),
                "PYTHONPATH": pythonpath,
            },
        )
        if options.keep_logs:
            print(f"logs: {processes.workdir}")
        for index, shape in enumerate(shapes(options, watchers, rate, rate_many)):
            if only is not None and only != ("one", "many")[index]:
                continue
            print(f"fan-out {shape.name}: bare broadcast ...", file=sys.stderr)
            reference = asyncio.run(measure(shape, bare, redis_server, quiesce=False))
            print(f"fan-out {shape.name}: quiesce ...", file=sys.stderr)
            measured = asyncio.run(measure(shape, service, redis_server, quiesce=True))
            if measured.redis_connections is not None:
                connection_counts.append(measured.redis_connections)
            emitting = None
            if shape.runs > 1:
                print(f"fan-out {shape.name}: quiesce, nobody watching ...", file=sys.stderr)
                emitting = asyncio.run(emit_only(shape, service))
            rows.extend(_rows(shape, measured, reference, emitting, judged=not options.smoke))
    rows.append(
        Row(
            goal="fan-out, Redis connections of the process",
            measured=" / ".join(str(n) for n in connection_counts) + " (one per scenario)",
            reference="4 commands + 1 Pub/Sub + 1 queue notices (README)",
            ratio=None,
            target=f"≤ {CONNECTION_BOUND}, whatever the watchers",
            met=None if options.smoke else all(n <= CONNECTION_BOUND for n in connection_counts),
        )
    )
    return rows


#: The store's connections on one Redis server (the README's "Redis connections per
#: replica process"): 4 for commands, 1 Pub/Sub, 1 for queued-run notices.
CONNECTION_BOUND = 6


def _rows(
    shape: Shape,
    measured: Figures,
    reference: Figures,
    emitting: float | None,
    *,
    judged: bool,
) -> list[Row]:
    p99_ratio = _ratio(measured.p99, reference.p99)
    cpu_ratio = _ratio(measured.cpu_per_event, reference.cpu_per_event)
    delivered = f"{measured.delivered:,}/{measured.expected:,} events" + (
        f", {measured.errors} errors" if measured.errors else ""
    )
    return [
        Row(
            goal=f"fan-out p99, {shape.name} at {shape.rate:g} ev/s per run",
            measured=f"{measured.describe()}, {delivered}",
            reference=f"bare {reference.describe()}, "
            f"{reference.delivered:,}/{reference.expected:,} events",
            ratio=p99_ratio,
            target=f"≤ {TARGET}",
            met=(p99_ratio is not None and p99_ratio <= TARGET and measured.errors == 0)
            if judged
            else None,
        ),
        Row(
            goal=f"fan-out CPU per delivered event, {shape.name}",
            measured=f"{measured.cpu_per_event * 1e6:,.0f} µs "
            f"(+ Redis {measured.redis_cpu_per_event * 1e6:,.0f} µs)"
            + (
                ""
                if emitting is None
                else f"; of which {emitting * 1e6:,.0f} µs emitting with nobody watching"
            ),
            reference=f"bare {reference.cpu_per_event * 1e6:,.0f} µs",
            ratio=cpu_ratio,
            target=f"≤ {TARGET}",
            met=(cpu_ratio is not None and cpu_ratio <= TARGET) if judged else None,
        ),
    ]


def _ratio(measured: float, reference: float) -> float | None:
    """None when the reference is zero or missing (a smoke run's CPU can round to 0)."""
    if not reference or math.isnan(reference) or math.isnan(measured):
        return None
    return measured / reference


def main() -> None:
    parser = section_parser(__doc__, "50 watchers, a few seconds")
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10.0, help="events/s of the one run")
    parser.add_argument("--rate-many", type=float, default=1.0, help="events/s of each of N runs")
    parser.add_argument("--only", choices=("one", "many"), help="one scenario: 1 run or N runs")
    args = parser.parse_args()
    rows = run(
        options_from(args),
        watchers=args.watchers,
        rate=args.rate,
        rate_many=args.rate_many,
        only=args.only,
    )
    print(render(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
