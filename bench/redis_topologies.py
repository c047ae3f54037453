"""Store throughput on every Redis topology, side by side in one run: what a cluster,
Sentinel and QUIESCE_REDIS_MIN_REPLICAS cost against one redis-server.

Topologies (a list: add one by adding an entry to ``topologies`` in main):

* standalone                  — one redis-server;
* cluster                     — 3 masters + 3 replicas (tests/topology/cluster.py);
* sentinel                    — a master + replica reached through 3 sentinels;
* replicated master           — that master as plain ``redis://`` (no WAIT);
* replicated master, MIN=1    — the same, every create and terminal write confirmed
                                by ``WAIT 1``;
* sentinel, MIN=1             — Sentinel, confirmed by ``WAIT 1``;
* cluster, MIN=1              — the cluster, each confirmed write's node sent its own
                                ``WAIT 1`` (one per node in the pipeline).

Each is measured with the store the service opens from its settings (open_store),
in this process, without HTTP: ``--concurrency`` tasks create runs (the create path:
the worker's run list + the create script, group-committed) for ``--duration``
seconds, then append progress events to them for as long. The order rotates every
round; figures are medians over the rounds, and ratios are against standalone. Every
process is started here, on free ports, without persistence, and stopped at the end.
The machine is shared: compare the rows of one run, not runs of different days.

Usage: .venv/bin/python bench/redis_topologies.py [--rounds 2] [--duration 2] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from service.config import Settings  # noqa: E402
from service.logging import configure_logging  # noqa: E402
from service.scheduler import new_run_id  # noqa: E402
from service.schemas import RunProgress, RunRecord, RunStarted, RunStartedData, utcnow  # noqa: E402
from service.store import open_store  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.topology.cluster import RedisClusterNodes, free_cluster_ports  # noqa: E402
from tests.topology.conftest import (  # noqa: E402
    DATA_PASSWORD,
    SENTINEL_PASSWORD,
    Processes,
    SentinelTopology,
    wait_for,
)


@dataclass
class Topology:
    label: str
    settings: Callable[[], Settings]
    #: Empties the topology's Redis after each measurement.
    flush: Callable[[], None]
    creates: list[float] = field(default_factory=list)
    appends: list[float] = field(default_factory=list)


def record() -> RunRecord:
    now = utcnow()
    return RunRecord(
        run_id=new_run_id(),
        task="sleep",
        status="running",
        created_at=now,
        updated_at=now,
        worker_id="bench",
        timeout_seconds=600,
    )


async def measure(settings: Settings, *, duration: float, concurrency: int) -> tuple[float, float]:
    """Creates per second, then progress appends per second, through one store."""
    store = open_store(settings)
    await store.start()
    runs: list[str] = []
    try:

        async def creator(deadline: float) -> int:
            done = 0
            while time.monotonic() < deadline:
                r = record()
                started = RunStarted(
                    created_at=r.created_at, data=RunStartedData(worker_id="bench")
                )
                await store.create(r, started)
                runs.append(r.run_id)
                done += 1
            return done

        deadline = time.monotonic() + duration
        created = sum(await asyncio.gather(*(creator(deadline) for _ in range(concurrency))))

        async def appender(index: int, deadline: float) -> int:
            done = 0
            while time.monotonic() < deadline:
                run_id = runs[(index + done * concurrency) % len(runs)]
                await store.append(run_id, RunProgress(created_at=utcnow(), data={"n": done}))
                done += 1
            return done

        deadline = time.monotonic() + duration
        appended = sum(await asyncio.gather(*(appender(i, deadline) for i in range(concurrency))))
        return created / duration, appended / duration
    finally:
        await store.close()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def flushall(port: int, password: str | None = None) -> Callable[[], None]:
    def flush() -> None:
        with redis.Redis(port=port, password=password) as client:
            client.flushall()

    return flush


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise SystemExit("redis-server and redis-cli must be on PATH")
    configure_logging("console", level=logging.ERROR)  # the warnings about persistence
    began = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="quiesce-bench-"))
    lone = Processes(directory)
    nodes = RedisClusterNodes(server=server, cli=cli, ports=free_cluster_ports(6))
    sentinel: SentinelTopology | None = None
    try:
        port = free_port()
        lone.spawn("lone", ["--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", str(directory)])  # fmt: skip
        wait_for(lambda: redis.Redis(port=port).ping(), "the lone redis-server")
        nodes.start()
        sentinel = SentinelTopology.start(directory / "sentinel")
        topo = sentinel
        master = f"redis://:{DATA_PASSWORD}@127.0.0.1:{topo.master_port}/0"
        flush_master = flushall(topo.master_port, DATA_PASSWORD)
        topologies = [
            Topology(
                "standalone",
                lambda: Settings(redis_url=f"redis://127.0.0.1:{port}/0"),
                flushall(port),
            ),
            Topology(
                "cluster (3 masters + 3 replicas)",
                lambda: Settings(redis_url=nodes.url),
                nodes.flush,
            ),
            Topology(
                "sentinel (master + replica)",
                lambda: Settings(redis_url=topo.url, redis_sentinel_password=SENTINEL_PASSWORD),
                flush_master,
            ),
            Topology(
                "replicated master, no WAIT", lambda: Settings(redis_url=master), flush_master
            ),
            Topology(
                "replicated master, MIN_REPLICAS=1",
                lambda: Settings(redis_url=master, redis_min_replicas=1),
                flush_master,
            ),
            Topology(
                "sentinel, MIN_REPLICAS=1",
                lambda: Settings(
                    redis_url=topo.url,
                    redis_sentinel_password=SENTINEL_PASSWORD,
                    redis_min_replicas=1,
                ),
                flush_master,
            ),
            Topology(
                "cluster, MIN_REPLICAS=1",
                lambda: Settings(redis_url=nodes.url, redis_min_replicas=1),
                nodes.flush,
            ),
        ]
        for entry in topologies:  # warm-up: connections, scripts loaded, code paths
            asyncio.run(measure(entry.settings(), duration=0.3, concurrency=args.concurrency))
            entry.flush()
        for round_index in range(args.rounds):
            shift = round_index % len(topologies)
            for entry in topologies[shift:] + topologies[:shift]:
                creates, appends = asyncio.run(
                    measure(entry.settings(), duration=args.duration, concurrency=args.concurrency)
                )
                entry.creates.append(creates)
                entry.appends.append(appends)
                entry.flush()
                print(
                    f"round {round_index + 1} {entry.label}: {creates:.0f} creates/s, "
                    f"{appends:.0f} appends/s",
                    flush=True,
                )
        base_creates = median(topologies[0].creates)
        base_appends = median(topologies[0].appends)
        print()
        print(
            f"store throughput, {args.concurrency} concurrent callers, {args.duration:g} s per "
            f"measurement, {args.rounds} rounds (medians), whole run "
            f"{time.monotonic() - began:.0f} s"
        )
        header = (
            f"{'topology':<36} {'creates/s':>10} {'vs standalone':>14} "
            f"{'appends/s':>10} {'vs standalone':>14}"
        )
        print(header)
        print("-" * len(header))
        for entry in topologies:
            creates, appends = median(entry.creates), median(entry.appends)
            print(
                f"{entry.label:<36} {creates:>10.0f} {creates / base_creates:>14.0%} "
                f"{appends:>10.0f} {appends / base_appends:>14.0%}"
            )
    finally:
        lone.stop()
        nodes.stop()
        shutil.rmtree(nodes.directory, ignore_errors=True)
        if sentinel is not None:
            sentinel.processes.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
