"""Store throughput per Redis topology, side by side in one run: what Sentinel and
QUIESCE_REDIS_MIN_REPLICAS cost.

Topologies (a list: add one by adding an entry to TOPOLOGIES):

* standalone          — one redis-server;
* replicated master   — the master of a master + replica, as ``redis://`` (no WAIT);
* + min replicas 1    — the same, every create and terminal write confirmed by WAIT 1;
* sentinel            — the same master reached through 3 sentinels (redis+sentinel://);
* sentinel + min 1    — and confirmed by WAIT 1.

Each is measured with the store the service opens from its settings (open_store),
in this process, without HTTP: ``--concurrency`` tasks create runs (the create path:
lease list + create script, group-committed) for ``--duration`` seconds, then append
progress events to them for as long. The order rotates every round; figures are the
medians over the rounds. Every process is started here and stopped at the end.

Usage: .venv/bin/python bench/redis_replication.py [--rounds 3] [--duration 3] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.config import Settings  # noqa: E402
from service.logging import configure_logging  # noqa: E402
from service.scheduler import new_run_id  # noqa: E402
from service.schemas import RunProgress, RunRecord, RunStarted, RunStartedData, utcnow  # noqa: E402
from service.store import open_store  # noqa: E402
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    configure_logging("console", level=logging.ERROR)  # the warnings about persistence
    directory = Path(tempfile.mkdtemp(prefix="quiesce-bench-"))
    lone = Processes(directory)
    topology = SentinelTopology.start(directory / "sentinel")
    try:
        from tests.conftest import free_port

        port = free_port()
        lone.spawn("lone", ["--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", str(directory)])  # fmt: skip
        import redis

        wait_for(lambda: redis.Redis(port=port).ping(), "the lone redis-server")
        master = f"redis://:{DATA_PASSWORD}@127.0.0.1:{topology.master_port}/0"
        topologies = [
            Topology("standalone", lambda: Settings(redis_url=f"redis://127.0.0.1:{port}/0")),
            Topology("replicated master, no WAIT", lambda: Settings(redis_url=master)),
            Topology(
                "replicated master, MIN_REPLICAS=1",
                lambda: Settings(redis_url=master, redis_min_replicas=1),
            ),
            Topology(
                "sentinel",
                lambda: Settings(redis_url=topology.url, redis_sentinel_password=SENTINEL_PASSWORD),
            ),
            Topology(
                "sentinel, MIN_REPLICAS=1",
                lambda: Settings(
                    redis_url=topology.url,
                    redis_sentinel_password=SENTINEL_PASSWORD,
                    redis_min_replicas=1,
                ),
            ),
        ]
        for entry in topologies:  # warm-up: connections, scripts loaded, code paths
            asyncio.run(measure(entry.settings(), duration=0.3, concurrency=args.concurrency))
        for round_index in range(args.rounds):
            shift = round_index % len(topologies)
            for entry in topologies[shift:] + topologies[:shift]:
                creates, appends = asyncio.run(
                    measure(entry.settings(), duration=args.duration, concurrency=args.concurrency)
                )
                entry.creates.append(creates)
                entry.appends.append(appends)
                with topology.node(topology.master_port) as client:
                    client.flushall()
                with redis.Redis(port=port) as client:
                    client.flushall()
        base_creates = median(topologies[0].creates)
        base_appends = median(topologies[0].appends)
        print()
        print(
            f"store throughput, {args.concurrency} concurrent callers, {args.duration:g} s each, "
            f"{args.rounds} rounds (medians)"
        )
        header = (
            f"{'topology':<36} {'creates/s':>10} {'vs first':>9} {'appends/s':>10} {'vs first':>9}"
        )
        print(header)
        print("-" * len(header))
        for entry in topologies:
            creates, appends = median(entry.creates), median(entry.appends)
            print(
                f"{entry.label:<36} {creates:>10.0f} {creates / base_creates:>9.0%} "
                f"{appends:>10.0f} {appends / base_appends:>9.0%}"
            )
    finally:
        lone.stop()
        topology.processes.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
