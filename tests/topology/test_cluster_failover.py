"""A cluster master killed (SIGKILL) under load: clients see 503s, never a 5xx or a hang.

Two replicas on a cluster of their own take creates (sleep runs with progress
events, i.e. event appends) from several clients and serve event streams that
resume with ``Last-Event-ID``; a master is killed while all of that runs. Then:
no 5xx but 503 (each with ``Retry-After``), no request longer than the store's call
timeout allows, every run answered 202 ends with exactly one terminal event (none
stays ``running``), every stream delivers each event once and ends with the
terminal event, and no run still executing is reaped as ``worker_lost`` (the
leases that lapsed during the outage are renewed before any reaper acts). The
killed master is started again a few seconds later, as a pod would be, and rejoins
as a replica. Without ``QUIESCE_REDIS_MIN_REPLICAS`` a failover may drop the last
writes a master acknowledged: runs that vanished entirely are counted and printed,
not asserted away. With ``QUIESCE_REDIS_MIN_REPLICAS=1`` no run answered 202 may be
lost. The longest 503 window and the recovery time are printed too (figures, not
assertions).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.store.redis import CALL_TIMEOUT_SECONDS
from service.web.app import create_app
from tests.conftest import AUTH, require_tool
from tests.integration.support import Client, events_of, raw_get, sleep_body
from tests.topology.cluster import RedisClusterNodes, running_cluster

pytestmark = [pytest.mark.slow, pytest.mark.topology]

TERMINAL = {"run_succeeded", "run_failed", "run_cancelled"}
#: The longest any request may take: the store's call deadline (its sweep may pass
#: it by 0.1 s) for each of the few store calls a request makes, plus slack for two
#: cores shared with six Redis processes.
REQUEST_BOUND_SECONDS = 3 * CALL_TIMEOUT_SECONDS + 1.0
LOAD_BEFORE_KILL_SECONDS = 1.5
LOAD_AFTER_KILL_SECONDS = 8.0
#: When the killed master is started again (it rejoins as its successor's replica).
RESTART_AFTER_SECONDS = 3.0


@pytest.fixture
def failover_cluster() -> Iterator[RedisClusterNodes]:
    """A cluster of its own: each test breaks it."""
    with running_cluster(require_tool("redis-server"), require_tool("redis-cli")) as nodes:
        yield nodes


@dataclass
class Observed:
    started: float = field(default_factory=time.monotonic)
    accepted: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    #: (time, status) of every create, per client
    creates: list[list[tuple[float, int]]] = field(default_factory=list)
    slowest: float = 0.0
    missing_retry_after: int = 0

    def note(self, status: int, took: float, headers: Any) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.slowest = max(self.slowest, took)
        if status == 503 and "retry-after" not in headers:
            self.missing_retry_after += 1


@pytest.fixture
async def replicas(
    settings: Settings, failover_cluster: RedisClusterNodes, min_replicas: int
) -> AsyncIterator[tuple[Client, Client]]:
    shared = replace(
        settings, lease_ttl_seconds=3, shutdown_grace_seconds=5, redis_min_replicas=min_replicas
    )
    url_b = f"redis://127.0.0.1:{failover_cluster.ports[1]}"
    app_a = create_app(replace(shared, worker_id="worker-a", redis_url=failover_cluster.url))
    app_b = create_app(replace(shared, worker_id="worker-b", redis_url=url_b))
    async with AsyncTestClient(app_a, timeout=30) as a, AsyncTestClient(app_b, timeout=30) as b:
        a.headers.update(AUTH)
        b.headers.update(AUTH)
        yield a, b


async def _create_loop(client: Client, seen: Observed, until: float, log: list[Any]) -> None:
    while time.monotonic() < until:
        began = time.monotonic()
        response = await client.post("/v1/runs", json=sleep_body(1.5, 3))
        took = time.monotonic() - began
        seen.note(response.status_code, took, response.headers)
        log.append((began - seen.started, response.status_code))
        if response.status_code == 202:
            seen.accepted.append(response.json()["run_id"])
        await asyncio.sleep(0.1)


async def _follow(client: Client, run_id: str, seen: Observed, until: float) -> list[Any]:
    """Stream a run to its end, resuming with Last-Event-ID; the events received."""
    received: list[dict[str, Any]] = []
    while time.monotonic() < until:
        headers = {"Last-Event-ID": received[-1]["id"]} if received else {}
        began = time.monotonic()
        stream = await raw_get(
            client, f"/v1/runs/{run_id}/events/stream", headers=headers, max_seconds=4
        )
        # A stream lasts as long as its run; only a refused one is timed.
        took = 0.0 if stream.status == 200 else time.monotonic() - began
        seen.note(stream.status, took, stream.headers)
        if stream.status == 200:
            received.extend(events_of(stream.text))
            if received and received[-1]["event"] in TERMINAL:
                return received
        await asyncio.sleep(0.2)
    return received


async def _final_state(client: Client, run_id: str, until: float) -> tuple[int, Any]:
    """The run once it is terminal (or 404, or whatever it reads at ``until``)."""
    while True:
        response = await client.get(f"/v1/runs/{run_id}/events", params={"limit": 1000})
        if response.status_code == 404:
            return 404, None
        if response.status_code == 200:
            types = [event["type"] for event in response.json()["events"]]
            if (types and types[-1] in TERMINAL) or time.monotonic() > until:
                return 200, types
        elif time.monotonic() > until:
            return response.status_code, None
        await asyncio.sleep(0.3)


def _windows(log: list[tuple[float, int]]) -> list[tuple[float, float]]:
    """(start, end) of each run of 503s in one client's create log."""
    windows, start = [], None
    for at, status in log:
        if status == 503 and start is None:
            start = at
        elif status != 503 and start is not None:
            windows.append((start, at))
            start = None
    if start is not None:
        windows.append((start, log[-1][0]))
    return windows


@pytest.mark.parametrize("min_replicas", [0, 1], ids=["no-wait", "min-replicas-1"])
async def test_a_master_killed_under_load(
    replicas: tuple[Client, Client], failover_cluster: RedisClusterNodes, min_replicas: int
) -> None:
    a, b = replicas
    seen = Observed()
    until = time.monotonic() + LOAD_BEFORE_KILL_SECONDS + LOAD_AFTER_KILL_SECONDS
    logs: list[list[Any]] = [[] for _ in range(4)]
    creators = [
        asyncio.create_task(_create_loop(client, seen, until, log))
        for client, log in zip((a, b, a, b), logs, strict=True)
    ]
    await asyncio.sleep(0.5)
    streamed = list(seen.accepted[:4])
    assert len(streamed) == 4
    streams = [
        asyncio.create_task(_follow(client, run_id, seen, until + 20))
        for client, run_id in zip((b, a, b, a), streamed, strict=False)
    ]
    await asyncio.sleep(LOAD_BEFORE_KILL_SECONDS - 0.5)
    victim = failover_cluster.masters()[0]
    killed_at = time.monotonic() - seen.started
    failover_cluster.kill(victim)
    asyncio.get_running_loop().call_later(RESTART_AFTER_SECONDS, failover_cluster.restart, victim)
    await asyncio.gather(*creators)
    received = await asyncio.gather(*streams)

    # Every 202-ed run: exactly one terminal event, last; none left running.
    finals = await asyncio.gather(
        *(_final_state(a, run_id, time.monotonic() + 25) for run_id in seen.accepted)
    )
    lost = [run for run, (status, _) in zip(seen.accepted, finals, strict=True) if status == 404]
    unresolved = [
        (run_id, status, types)
        for run_id, (status, types) in zip(seen.accepted, finals, strict=True)
        if status not in (200, 404)
        or (status == 200 and (not types or sum(t in TERMINAL for t in types) != 1))
        or (status == 200 and types[-1] not in TERMINAL)
    ]

    # A sleep run fails only when it is reaped: a run still executing must not be.
    reaped = [
        run for run, (status, types) in zip(seen.accepted, finals, strict=True)
        if status == 200 and types and types[-1] == "run_failed"
    ]  # fmt: skip

    windows = [w for log in logs for w in _windows(log)]
    longest = max((end - start for start, end in windows), default=0.0)
    last_503 = max((end for _, end in windows), default=killed_at)
    print(
        f"\nfailover (min replicas {min_replicas}): killed master :{victim} at "
        f"{killed_at:.2f}s; "
        f"creates {sum(len(log) for log in logs)} ({seen.statuses}); "
        f"202-ed runs {len(seen.accepted)}, lost {len(lost)}, reaped {len(reaped)}; "
        f"longest 503 window {longest:.2f}s; recovered {max(last_503 - killed_at, 0):.2f}s "
        f"after the kill; slowest request {seen.slowest:.2f}s"
    )

    assert not [s for s in seen.statuses if s >= 500 and s != 503], seen.statuses
    assert seen.missing_retry_after == 0
    assert seen.slowest < REQUEST_BOUND_SECONDS
    assert unresolved == []
    assert reaped == []
    if min_replicas:
        assert lost == [], "a run answered 202 was lost although a replica confirmed it"
    for run_id, events in zip(streamed, received, strict=False):
        if run_id in lost:
            continue
        kinds = [event["event"] for event in events]
        assert kinds, run_id
        assert kinds[-1] in TERMINAL, (run_id, kinds)
        assert sum(kind in TERMINAL for kind in kinds) == 1
        ids = [event["id"] for event in events]
        assert len(ids) == len(set(ids)), "a resumed stream repeated an event"
    # The service recovered by itself: creates succeed again on both replicas (with
    # replica confirmation, once the restarted node has synced as a replica).
    for client in (a, b):
        deadline = time.monotonic() + 20
        while (created := await client.post("/v1/runs", json=sleep_body(0.01))).status_code != 202:
            assert created.status_code == 503, created.text
            assert time.monotonic() < deadline, "creates did not recover"
            await asyncio.sleep(0.2)
