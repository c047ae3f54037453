"""A Sentinel failover under load, against the real server: the scenario and its figures.

Used by test_sentinel_failover.py (which asserts on the outcome) and by
bench/sentinel_failover.py (which prints the figures with and without
``QUIESCE_REDIS_MIN_REPLICAS``). While creates (each retried with its own
``Idempotency-Key`` on 503, as a client should), progress appends and an event stream
run, the master is SIGKILLed; once the sentinels have promoted the replica, the old
master is started again (empty, as a pod without a volume) and becomes a replica.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import start_server, stop
from tests.topology.conftest import SENTINEL_PASSWORD, SentinelTopology

#: Generous bounds that only a broken service exceeds.
RECOVERY_LIMIT_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 10.0
TERMINAL_EVENTS = {"run_succeeded", "run_failed", "run_cancelled"}


@dataclass
class Outcome:
    statuses: dict[int, int] = field(default_factory=dict)
    #: 503 answers without Retry-After, and anything but 202/503 (status, body).
    bad_answers: list[tuple[int, str]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    longest_503_window: float = 0.0
    recovery_seconds: float | None = None
    #: From the kill until the sentinels named another master.
    promotion_seconds: float | None = None
    #: Accepted runs that read 404 after the failover.
    lost: list[str] = field(default_factory=list)
    #: Accepted runs whose events hold other than exactly one terminal event.
    not_one_terminal: list[str] = field(default_factory=list)
    #: Accepted runs still running long after they should have ended.
    stuck: list[str] = field(default_factory=list)
    stream_events: list[dict[str, Any]] = field(default_factory=list)
    stream_reconnects: int = 0

    def figures(self) -> str:
        recovery = "n/a" if self.recovery_seconds is None else f"{self.recovery_seconds:.2f}s"
        return (
            f"accepted {len(self.accepted)}, lost {len(self.lost)}, stuck {len(self.stuck)}, "
            f"not exactly one terminal {len(self.not_one_terminal)}; longest 503 window "
            f"{self.longest_503_window:.2f}s; promotion {self.promotion_seconds or 0:.2f}s; "
            f"recovery (kill to first 202) {recovery}; "
            f"answers {dict(sorted(self.statuses.items()))}; "
            f"stream reconnects {self.stream_reconnects}"
        )


async def _follow(client: httpx.AsyncClient, run_id: str, outcome: Outcome) -> None:
    """An EventSource: read the stream; reconnect with Last-Event-ID until terminal."""
    last_id: str | None = None
    while True:
        headers = {} if last_id is None else {"Last-Event-ID": last_id}
        try:
            async with client.stream(
                "GET", f"/v1/runs/{run_id}/events/stream", headers=headers
            ) as response:
                if response.status_code == 503:
                    await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                    outcome.stream_reconnects += 1
                    continue
                assert response.status_code == 200, response.status_code
                event: dict[str, Any] = {}
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        event["id"] = line[4:]
                    elif line.startswith("event: "):
                        event["type"] = line[7:]
                    elif line.startswith("data: "):
                        event["data"] = json.loads(line[6:])
                    elif line == "" and "id" in event:
                        outcome.stream_events.append(event)
                        last_id = event["id"]
                        if event.get("type") in TERMINAL_EVENTS:
                            return
                        event = {}
        except httpx.HTTPError:
            pass
        outcome.stream_reconnects += 1
        await asyncio.sleep(0.2)


async def _create_until_accepted(
    client: httpx.AsyncClient, key: str, outcome: Outcome, windows: dict[str, float]
) -> None:
    body = {"task": "sleep", "input": {"seconds": 0.3, "steps": 3}}
    while True:
        started = time.monotonic()
        response = await client.post("/v1/runs", json=body, headers={"Idempotency-Key": key})
        outcome.statuses[response.status_code] = outcome.statuses.get(response.status_code, 0) + 1
        if response.status_code == 202:
            outcome.accepted.append(response.json()["run_id"])
            if "since" in windows:
                window = time.monotonic() - windows.pop("since")
                outcome.longest_503_window = max(outcome.longest_503_window, window)
            if "killed" in windows and outcome.recovery_seconds is None:
                outcome.recovery_seconds = time.monotonic() - windows["killed"]
            return
        if response.status_code != 503 or "Retry-After" not in response.headers:
            outcome.bad_answers.append((response.status_code, response.text[:200]))
            return
        windows.setdefault("since", started)
        await asyncio.sleep(0.2)  # sooner than Retry-After: to measure the window finely


async def run_failover(
    directory: Path, *, min_replicas: int, creators: int = 4, before: float = 1.0
) -> Outcome:
    """The whole scenario on a new topology and server; the outcome (nothing asserted)."""
    topology = SentinelTopology.start(directory / f"sentinel-{min_replicas}")
    server = None
    try:
        server = start_server(
            directory,
            topology.url,
            QUIESCE_REDIS_SENTINEL_PASSWORD=SENTINEL_PASSWORD,
            QUIESCE_REDIS_MIN_REPLICAS=str(min_replicas),
            QUIESCE_LEASE_TTL_SECONDS="5",
            # Runs held during the outage (their terminal writes wait) must not fill it.
            QUIESCE_MAX_ACTIVE_RUNS="5000",
        )
        outcome = Outcome()
        windows: dict[str, float] = {}
        async with httpx.AsyncClient(
            base_url=server.url, timeout=REQUEST_TIMEOUT_SECONDS
        ) as client:
            long_run = await client.post(
                "/v1/runs", json={"task": "sleep", "input": {"seconds": 6, "steps": 24}}
            )
            assert long_run.status_code == 202, long_run.text
            long_id = long_run.json()["run_id"]
            outcome.accepted.append(long_id)
            follower = asyncio.create_task(_follow(client, long_id, outcome))
            stop_creating = asyncio.Event()
            counter = iter(range(1_000_000))

            async def creator(index: int) -> None:
                while not stop_creating.is_set():
                    key = f"failover-{min_replicas}-{index}-{next(counter)}"
                    await _create_until_accepted(client, key, outcome, windows)
                    await asyncio.sleep(0.05)

            creating = [asyncio.create_task(creator(i)) for i in range(creators)]
            await asyncio.sleep(before)
            old_master = await asyncio.to_thread(topology.kill_master)
            windows["killed"] = time.monotonic()
            deadline = time.monotonic() + RECOVERY_LIMIT_SECONDS
            while not topology.failover_done(old_master) and time.monotonic() < deadline:  # noqa: ASYNC110 - polls another process
                await asyncio.sleep(0.1)
            outcome.promotion_seconds = time.monotonic() - windows["killed"]
            topology.restart(old_master)
            while outcome.recovery_seconds is None and time.monotonic() < deadline:  # noqa: ASYNC110 - set by the creators
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # traffic on the new master too
            stop_creating.set()
            await asyncio.wait_for(asyncio.gather(*creating), RECOVERY_LIMIT_SECONDS)
            await asyncio.wait_for(follower, RECOVERY_LIMIT_SECONDS)
            await _audit(client, outcome)
        return outcome
    finally:
        if server is not None:
            stop(server)
        topology.processes.stop()


async def _audit(client: httpx.AsyncClient, outcome: Outcome) -> None:
    """Every accepted run: still there, terminal, with exactly one terminal event."""
    deadline = time.monotonic() + RECOVERY_LIMIT_SECONDS
    for run_id in outcome.accepted:
        while True:
            response = await client.get(f"/v1/runs/{run_id}")
            if response.status_code == 404:
                outcome.lost.append(run_id)
                break
            if response.status_code == 200 and response.json()["status"] != "running":
                events = await client.get(f"/v1/runs/{run_id}/events", params={"limit": 1000})
                types = [event["type"] for event in events.json()["events"]]
                if sum(t in TERMINAL_EVENTS for t in types) != 1:
                    outcome.not_one_terminal.append(run_id)
                break
            if time.monotonic() > deadline:
                outcome.stuck.append(run_id)
                break
            await asyncio.sleep(0.1)
