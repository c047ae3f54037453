"""``POST /v1/runs`` under wrk, on several servers side by side: what the ``create`` and
``peers`` sections of ``perf.py`` share.

Every request carries its own ``Idempotency-Key`` (``post_create.lua``), so a durable
server writes the run's record *and* claims its key before it answers, and the body
is ``{"task":"sleep","input":{"seconds":0}}``: in Quiesce every create also executes
its run (start, one progress event, finalize) in the same process.

Each server is warmed up, then measured in rounds whose order rotates, so no server
always goes first; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from perf_table import Options
from support import Load, Processes, Started, load_of, median, post_accepted, wrk

BODY = b'{"task":"sleep","input":{"seconds":0}}'
#: Every Quiesce server of these sections: no 429 at capacity, a short drain at exit.
QUIESCE_ENV = {"QUIESCE_MAX_ACTIVE_RUNS": "100000", "QUIESCE_SHUTDOWN_GRACE_SECONDS": "5"}


@dataclass(frozen=True)
class Plan:
    """How long and how often each server is driven."""

    rounds: int
    seconds: int  # wrk takes whole seconds
    warmup: int
    threads: int = 1
    #: Between two measurements: the previous server's runs finish.
    pause: float = 1.0


def plan_for(options: Options) -> Plan:
    if options.smoke:
        return Plan(rounds=1, seconds=1, warmup=1, pause=0.2)
    return Plan(rounds=3, seconds=8, warmup=3)


@dataclass
class Server:
    """A server under load and what it measured, per number of connections."""

    label: str
    url: str
    #: Called after each measurement (e.g. to wait for a queue to drain); may note
    #: a figure of its own in ``notes``.
    after_load: Callable[[Server], None] | None = None
    loads: dict[int, list[Load]] = field(default_factory=dict)
    notes: dict[str, list[float]] = field(default_factory=dict)

    def rps(self, connections: int) -> float:
        return median([load.rps for load in self.loads[connections]])

    def p99_ms(self, connections: int) -> float:
        return median([load.p99_ms for load in self.loads[connections]])

    def failures(self, connections: int) -> int:
        return sum(load.failures for load in self.loads[connections])

    def summary(self, connections: int) -> str:
        failures = self.failures(connections)
        return (
            f"{self.rps(connections):,.0f} req/s, p99 {self.p99_ms(connections):.1f} ms, "
            f"{failures} non-2xx or socket errors"
        )


def ratio(server: Server, reference: Server, connections: int) -> float:
    """Median over the rounds of server req/s / reference req/s (same round)."""
    pairs = zip(server.loads[connections], reference.loads[connections], strict=True)
    return median([ours.rps / theirs.rps for ours, theirs in pairs])


def quiesce_redis(procs: Processes, name: str, redis: Started, env: dict[str, str]) -> Started:
    """``quiesce serve`` on ``redis`` (the 202 is sent once the record is in Redis)."""
    url = f"redis://127.0.0.1:{redis.port}/0"
    return procs.quiesce(name, {**QUIESCE_ENV, **env, "QUIESCE_REDIS_URL": url})


def run_load(url: str, plan: Plan, connections: int, seconds: int) -> Load:
    result = wrk(
        url,
        seconds=seconds,
        connections=connections,
        threads=plan.threads,
        body=BODY,
        key_prefix=secrets.token_hex(6),
    )
    return load_of(result)


def measure(section: str, servers: list[Server], plan: Plan, connections: int) -> None:
    """Warm each server up, then the rounds; fills ``server.loads[connections]``."""
    for server in servers:
        post_accepted(server.url, BODY, {"Idempotency-Key": f"bench-check-{secrets.token_hex(6)}"})
    for server in servers:
        run_load(server.url, plan, connections, plan.warmup)
        if server.after_load is not None:
            server.after_load(server)
        server.notes.clear()
        server.loads[connections] = []
    for i in range(plan.rounds):
        shift = i % len(servers)
        for server in servers[shift:] + servers[:shift]:
            time.sleep(plan.pause)
            load = run_load(server.url, plan, connections, plan.seconds)
            server.loads[connections].append(load)
            print(
                f"  {section} round {i + 1}, {connections} conns, {server.label}: "
                f"{load.rps:,.0f} req/s, p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms, "
                f"{load.failures} non-2xx or socket errors",
                flush=True,
            )
            if server.after_load is not None:
                server.after_load(server)


def check_alive(servers: dict[str, Started]) -> None:
    """A server that died during the load makes its figures meaningless."""
    dead = [name for name, started in servers.items() if started.process.poll() is not None]
    if dead:
        raise RuntimeError(f"exited during the measurement: {', '.join(dead)}")
