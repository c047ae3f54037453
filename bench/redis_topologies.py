"""Create and event-append throughput on each Redis topology, side by side in one run.

Topologies are entries of ``TOPOLOGIES`` (a name and a function that starts it and
returns its URL and extra environment): today one redis-server (``standalone``) and
a 3-master, 3-replica Redis Cluster (``cluster``), both private, on free ports,
without persistence. Per topology:

* **create** — ``quiesce serve`` (the real Granian process) on that topology; a
  small asyncio keep-alive HTTP client keeps ``--connections`` creates in flight for
  ``--duration`` seconds (runs of 0 s: each create also executes and finalizes its
  run).
* **append** — a RedisRunStore in this process: ``--runs`` runs created, then
  ``--connections`` concurrent appenders add progress events for ``--duration``
  seconds (the group-commit path of every progress event, without HTTP).

Rounds rotate the order of the topologies; medians are printed. The machine is
shared, so compare the columns of one run, not runs of different days.

Usage: .venv/bin/python bench/redis_topologies.py [--rounds 2] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from support import Processes, free_port, median, wait_until

from service.schemas import RunProgress, RunRecord, RunStarted, RunStartedData, utcnow
from service.store.redis import RedisRunStore

BODY = b'{"task":"sleep","input":{"seconds":0}}'


@dataclass
class Topology:
    name: str
    #: Starts the topology; returns its URL and the extra environment of the service.
    start: Callable[[Processes], tuple[str, dict[str, str]]]
    creates: list[float] = field(default_factory=list)
    appends: list[float] = field(default_factory=list)
    errors: int = 0


def standalone(procs: Processes) -> tuple[str, dict[str, str]]:
    server = procs.redis_server("standalone")
    return f"redis://127.0.0.1:{server.port}/0", {}


def cluster(procs: Processes) -> tuple[str, dict[str, str]]:
    """Six redis-server processes joined by ``redis-cli --cluster create``."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        raise SystemExit("redis-server and redis-cli must be on PATH")
    ports = []
    while len(ports) < 6:
        port = free_port()
        if port < 55535 and port not in ports:
            ports.append(port)
    for port in ports:
        node_dir = procs.workdir / f"node-{port}"
        node_dir.mkdir()
        started = procs.spawn(
            f"cluster-{port}",
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(node_dir / "nodes.conf"), "--dir", str(node_dir),
             "--save", "", "--appendonly", "no"],
            port=port,
        )  # fmt: skip
        wait_until(lambda p=port: _answers(p), 10, started, "a cluster node did not start")
    subprocess.run(
        [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas",
         "1", "--cluster-yes"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with redis.Redis(port=ports[0]) as client:
            if b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"):
                break
        time.sleep(0.1)
    return f"redis://127.0.0.1:{ports[0]}", {}


#: One entry per topology; a new topology is one more entry.
TOPOLOGIES: list[Topology] = [
    Topology("standalone", standalone),
    Topology("cluster", cluster),
]


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


async def create_load(url: str, *, seconds: float, connections: int) -> tuple[float, int]:
    """Creates per second answered 202, and how many were not 202.

    A minimal HTTP/1.1 keep-alive client on raw asyncio streams: httpx would spend
    more CPU than the server on this shared machine."""
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"POST /v1/runs HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    done = errors = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.monotonic() < stop:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if head.startswith(b"HTTP/1.1 202"):
                    done += 1
                else:
                    errors += 1
        finally:
            writer.close()

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return done / (time.monotonic() - began), errors


async def append_load(
    url: str, *, seconds: float, connections: int, runs: int
) -> tuple[float, int]:
    """Progress events appended per second through one RedisRunStore."""
    store = RedisRunStore(url, retention_seconds=600)
    await store.start()
    try:
        records = []
        for i in range(runs):
            now = utcnow()
            record = RunRecord(
                run_id=f"run_bench{time.monotonic_ns()}{i}", task="sleep", status="running",
                created_at=now, updated_at=now, worker_id="bench", timeout_seconds=600,
            )  # fmt: skip
            started = RunStarted(created_at=now, data=RunStartedData(worker_id="bench"))
            await store.create(record, started)
            records.append(record)
        done = errors = 0
        stop = time.monotonic() + seconds

        async def appender(index: int) -> None:
            nonlocal done, errors
            run_id = records[index % len(records)].run_id
            while time.monotonic() < stop:
                try:
                    await store.append(run_id, RunProgress(created_at=utcnow(), data={"i": done}))
                    done += 1
                except Exception:  # counted: the figure says how many
                    errors += 1

        began = time.monotonic()
        await asyncio.gather(*(appender(i) for i in range(connections)))
        return done / (time.monotonic() - began), errors
    finally:
        await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--runs", type=int, default=200, help="runs the appenders write to")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    env = {"QUIESCE_MAX_ACTIVE_RUNS": "100000", "QUIESCE_SHUTDOWN_GRACE_SECONDS": "5"}
    with Processes(keep_logs=args.keep_logs) as procs:
        servers = {}
        for topology in TOPOLOGIES:
            url, extra = topology.start(procs)
            server = procs.quiesce(topology.name, {**env, "QUIESCE_REDIS_URL": url, **extra})
            servers[topology.name] = (url, server)
            asyncio.run(create_load(server.url, seconds=1, connections=args.connections))
        for i in range(args.rounds):
            order = TOPOLOGIES[i % len(TOPOLOGIES) :] + TOPOLOGIES[: i % len(TOPOLOGIES)]
            for topology in order:
                url, server = servers[topology.name]
                time.sleep(1.0)
                rate, errors = asyncio.run(
                    create_load(server.url, seconds=args.duration, connections=args.connections)
                )
                topology.creates.append(rate)
                topology.errors += errors
                rate2, errors2 = asyncio.run(
                    append_load(
                        url, seconds=args.duration, connections=args.connections, runs=args.runs
                    )
                )
                topology.appends.append(rate2)
                topology.errors += errors2
                print(
                    f"round {i + 1} {topology.name}: {rate:.0f} creates/s, {rate2:.0f} appends/s",
                    flush=True,
                )
    print()
    print(
        f"{args.connections} in flight, {args.duration:g} s per measurement, "
        f"{args.rounds} rounds (medians; per-round figures in brackets)"
    )
    header = f"{'topology':<12} {'creates/s':>10} {'appends/s':>10} {'errors':>7}"
    print(header)
    print("-" * len(header))
    for topology in TOPOLOGIES:
        print(
            f"{topology.name:<12} {median(topology.creates):>10.0f} "
            f"{median(topology.appends):>10.0f} {topology.errors:>7}   "
            f"[{', '.join(f'{r:.0f}' for r in topology.creates)}] "
            f"[{', '.join(f'{r:.0f}' for r in topology.appends)}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
