"""Does one replica keep answering under a flood of long-lived connections?

Starts one ``quiesce serve`` (its real Granian command line and default limits) on
loopback, creates one long run, then holds open ``--streams`` event streams on it
and ``--slow-bodies`` creates whose body is sent one byte a second (each one that
the server ends with 408 is replaced at once, so that many are always in flight).
While all of that is held, it times ``/healthz``, ``/readyz``, ``/metrics`` and a
create — each on a new connection, as the kubelet and a webhook sender make them —
``--samples`` times, one round a second, and prints p50 and max per probe, with the
server's open streams, refusals, 408s, memory and file descriptors.

Bounded: everything stops after ``--max-seconds`` even if the server stops
answering, and every process the script started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support import Processes, Started, _tree

PROBES = ("/healthz", "/readyz", "/metrics", "create")
BODY_LENGTH = 1000


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return float("nan")


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Flood:
    """The long-lived connections: streams held open and bodies sent slowly."""

    def __init__(self, port: int, run_id: str) -> None:
        self.port = port
        self.run_id = run_id
        self.streams_open = 0
        self.streams_refused: dict[int, int] = {}
        self.stream_errors = 0
        self.bodies_in_flight = 0
        self.bodies_answered: dict[int, int] = {}
        self.body_errors = 0
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def hold_stream(self, opened: asyncio.Semaphore) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            self.stream_errors += 1
            opened.release()
            return
        try:
            writer.write(
                f"GET /v1/runs/{self.run_id}/events/stream HTTP/1.1\r\nHost: bench\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split()[1])
            if status != 200:
                self.streams_refused[status] = self.streams_refused.get(status, 0) + 1
                return
            await reader.readuntil(b": stream opened\n\n")
            self.streams_open += 1
            opened.release()
            while not self.stopping.is_set():  # keep-alives: read and drop
                if not await reader.read(4096):
                    break
            self.streams_open -= 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.stream_errors += 1
        finally:
            if opened.locked():
                opened.release()
            writer.close()

    async def slow_body(self) -> None:
        """One slow create after another, each sent a byte a second until answered."""
        while not self.stopping.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.body_errors += 1
                await asyncio.sleep(1)
                continue
            self.bodies_in_flight += 1
            answer: asyncio.Future[bytes] | None = None
            try:
                writer.write(
                    b"POST /v1/runs HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {BODY_LENGTH}\r\n\r\n".encode()
                )
                answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
                while not answer.done() and not self.stopping.is_set():
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.wait({answer}, timeout=1.0)
                if answer.done():
                    status = int(answer.result().split()[1])
                    self.bodies_answered[status] = self.bodies_answered.get(status, 0) + 1
            except (OSError, asyncio.IncompleteReadError, ValueError):
                if not self.stopping.is_set():
                    self.body_errors += 1
            finally:
                self.bodies_in_flight -= 1
                if answer is not None:
                    answer.cancel()
                    if answer.done() and not answer.cancelled():
                        answer.exception()  # retrieved: a read cut short by the stop
                writer.close()

    async def start(self, streams: int, bodies: int) -> None:
        # At most 200 streams being set up at once; each holds a permit until open.
        opened = asyncio.Semaphore(200)
        for _ in range(streams):
            await opened.acquire()
            self.tasks.append(asyncio.create_task(self.hold_stream(opened)))
        for _ in range(bodies):
            self.tasks.append(asyncio.create_task(self.slow_body()))
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self.stopping.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def timed(call: Callable[[], Awaitable[httpx.Response]]) -> tuple[float, int]:
    started = time.perf_counter()
    try:
        response = await call()
        status = response.status_code
    except httpx.HTTPError:
        status = 0
    return (time.perf_counter() - started) * 1000, status


async def probe_round(url: str) -> dict[str, tuple[float, int]]:
    """Each probe on its own new connection (no keep-alive), one after another."""
    results = {}
    for probe in PROBES:
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
            if probe == "create":
                results[probe] = await timed(
                    lambda c=client: c.post(
                        "/v1/runs", json={"task": "sleep", "input": {"seconds": 0}}
                    )
                )
            else:
                results[probe] = await timed(lambda c=client, p=probe: c.get(p))
    return results


def rss_mib(started: Started) -> float:
    total = 0
    for pid in _tree(started.process.pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def open_fds(started: Started) -> int:
    total = 0
    for pid in _tree(started.process.pid):
        with contextlib.suppress(OSError):
            total += len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return total


async def measure(args: argparse.Namespace, server: Started) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
        created = await client.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 3600}})
        assert created.status_code == 202, created.text
        run_id = created.json()["run_id"]
        idle_rss = rss_mib(server)

    flood = Flood(server.port, run_id)
    setup_started = time.monotonic()
    await flood.start(args.streams, args.slow_bodies)
    await asyncio.sleep(2)  # the last slow bodies are in flight
    print(
        f"held: {flood.streams_open} streams open, refused {flood.streams_refused or 0}, "
        f"{flood.bodies_in_flight} slow bodies in flight "
        f"(set up in {time.monotonic() - setup_started:.1f}s)"
    )
    samples: dict[str, list[float]] = {probe: [] for probe in PROBES}
    statuses: dict[str, set[int]] = {probe: set() for probe in PROBES}
    for _ in range(args.samples):
        round_started = time.monotonic()
        for probe, (ms, status) in (await probe_round(server.url)).items():
            samples[probe].append(ms)
            statuses[probe].add(status)
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - round_started)))

    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
        text = (await client.get("/metrics")).text
    held_rss, fds = rss_mib(server), open_fds(server)
    streams_open, bodies = flood.streams_open, flood.bodies_in_flight
    await flood.stop()

    print(f"during the probes: {streams_open} streams open, {bodies} slow bodies in flight")
    print(
        f"server: quiesce_streams_active {metric(text, 'quiesce_streams_active'):g}, "
        f"quiesce_streams_rejected_total {metric(text, 'quiesce_streams_rejected_total'):g}, "
        f"quiesce_request_body_timeouts_total "
        f"{metric(text, 'quiesce_request_body_timeouts_total'):g}, "
        f"RSS {idle_rss:.0f} MiB idle -> {held_rss:.0f} MiB held, {fds} open fds"
    )
    print(
        f"client: slow bodies answered {flood.bodies_answered}, "
        f"stream errors {flood.stream_errors}, body errors {flood.body_errors}"
    )
    print()
    print("| probe | p50 ms | max ms | statuses | samples |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for probe in PROBES:
        values = samples[probe]
        worst = max(worst, max(values))
        print(
            f"| {probe} | {statistics.median(values):.1f} | {max(values):.1f} | "
            f"{sorted(statuses[probe])} | {len(values)} |"
        )
    ok = worst < 1000 and all(statuses[p] == ({202} if p == "create" else {200}) for p in PROBES)
    print(f"\nevery probe answered within 1 s with its success status: {'yes' if ok else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1500)
    parser.add_argument("--slow-bodies", type=int, default=500)
    parser.add_argument("--samples", type=int, default=12, help="probe rounds, one a second")
    parser.add_argument("--store", choices=("redis", "memory"), default="redis")
    parser.add_argument("--max-seconds", type=float, default=180.0)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    limit = raise_fd_limit()
    needed = args.streams + args.slow_bodies + 100
    if limit < needed:
        raise SystemExit(f"the open-files limit is {limit}; this needs about {needed}")
    with Processes(keep_logs=args.keep_logs) as processes:
        env = {}
        if args.store == "redis":
            env["QUIESCE_REDIS_URL"] = f"redis://127.0.0.1:{processes.redis_server().port}/0"
        server = processes.quiesce("quiesce", env)
        print(
            f"quiesce serve ({args.store} store), {args.streams} streams + "
            f"{args.slow_bodies} slow bodies, {args.samples} probe rounds"
        )
        try:
            asyncio.run(asyncio.wait_for(measure(args, server), args.max_seconds))
        except TimeoutError:
            print(f"stopped after {args.max_seconds:g}s: the server stopped answering")
        if args.keep_logs:
            print(f"logs: {processes.workdir}")


if __name__ == "__main__":
    main()
