"""A rolling update at load, driven the way Kubernetes does it, and what it did to runs.

Used by ``tests/e2e/test_rollout_retries.py`` (which asserts) and ``bench/rollout.py``
(which prints the figures). Real ``quiesce serve`` processes on one real Redis:

1. ``replicas`` replicas start; creators post runs longer than the grace, with
   ``retry``, round-robin over the replicas that are up (a refused or failed create
   is sent again to the next one, as a load balancer and a retrying client would);
2. each replica in turn is stopped like the kubelet stops a pod — the preStop hook
   (``quiesce drain``), then SIGTERM — and a replacement (a new pod name) is started;
3. one replica is SIGKILLed (its whole process group, as an OOM kill of the pod) and
   replaced;
4. the creators stop and every run is read back from Redis once all are terminal.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from service.schemas import event_type
from service.store.redis import RedisRunStore
from tests.e2e.conftest import BIN, Server, stop

StartServer = Callable[[str], Server]


@dataclass
class RunOutcome:
    run_id: str
    status: str
    reason: str | None
    attempt: int
    #: (type, attempt, worker or reason) of every event but progress, in order.
    history: list[tuple[str, int | None, str | None]]


@dataclass
class RolloutReport:
    runs: list[RunOutcome] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    #: Seconds from the SIGKILL until every run of the killed replica had succeeded.
    crash_recovery_seconds: float | None = None
    seconds: float = 0.0
    creates_refused: int = 0

    def count(self, predicate: Callable[[RunOutcome], bool]) -> int:
        return sum(1 for run in self.runs if predicate(run))

    def figures(self) -> dict[str, Any]:
        requeues = [h for run in self.runs for h in run.history if h[0] == "run_requeued"]
        return {
            "runs": len(self.runs),
            "succeeded": self.count(lambda r: r.status == "succeeded"),
            "failed": self.count(lambda r: r.status == "failed"),
            "requeued": len(requeues),
            "requeued_shutdown": sum(1 for h in requeues if h[2] == "shutdown"),
            "requeued_worker_lost": sum(1 for h in requeues if h[2] == "worker_lost"),
            "adopted": sum(
                1 for run in self.runs for h in run.history if h[0] == "run_started" and h[1] != 1
            ),
            "max_attempt": max((run.attempt for run in self.runs), default=0),
            "crash_recovery_seconds": self.crash_recovery_seconds,
            "creates_refused_then_resent": self.creates_refused,
            "seconds": round(self.seconds, 1),
        }


class Rollout:
    def __init__(
        self,
        start: StartServer,
        store: RedisRunStore,
        *,
        replicas: int = 3,
        run_seconds: float = 3.0,
        create_interval: float = 0.1,
        max_attempts: int = 5,
    ) -> None:
        self._start = start
        self._store = store
        self._replicas = replicas
        self._run_seconds = run_seconds
        self._interval = create_interval
        self._max_attempts = max_attempts
        self._up: list[Server] = []
        self._names = itertools.count(1)
        self._run_ids: list[str] = []
        self._creating = True
        self._crash_at = 0.0
        self.report = RolloutReport()

    async def run(self) -> RolloutReport:
        began = time.monotonic()
        try:
            self._up = list(await asyncio.gather(*(self._spawn() for _ in range(self._replicas))))
            creators = [asyncio.create_task(self._create_loop()) for _ in range(2)]
            await asyncio.sleep(self._run_seconds)  # every replica has runs under way
            for _ in range(self._replicas):
                await self._stop_like_the_kubelet(self._up[0])
                await asyncio.sleep(self._run_seconds / 2)
            crashed_runs = await self._crash(self._up[0])
            self._creating = False
            await asyncio.gather(*creators)
            await self._wait_all_terminal(crashed_runs)
            self.report.runs = [await self._outcome(run_id) for run_id in self._run_ids]
        finally:
            for server in self._up:
                stop(server)
        self.report.seconds = time.monotonic() - began
        return self.report

    # --- the platform -------------------------------------------------------------

    async def _spawn(self) -> Server:
        return await asyncio.to_thread(self._start, f"pod-{next(self._names)}")

    async def _stop_like_the_kubelet(self, server: Server) -> None:
        self._up.remove(server)
        replacement = asyncio.create_task(self._spawn())  # the Deployment's surge pod
        hook = await asyncio.create_subprocess_exec(
            str(BIN / "quiesce"), "drain", "--timeout", "15",
            env=server.command_env(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        hook_code = await hook.wait()
        assert hook_code == 0, f"the preStop hook failed ({hook_code}):\n{server.log()}"
        server.signal(signal.SIGTERM)
        code, _ = await asyncio.to_thread(server.wait_exit, 10.0)
        assert code == 0, f"exit {code}:\n{server.log()}"
        self.report.stopped.append(server.env["QUIESCE_WORKER_ID"])
        self._up.append(await replacement)

    async def _crash(self, server: Server) -> list[str]:
        """SIGKILL a replica with runs under way; the ids of the runs it held."""
        self._up.remove(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            state = (await http.get("/admin/state")).json()
        held = [run["run_id"] for run in state["active_runs"]]
        assert held, "the replica to crash had no runs"
        replacement = asyncio.create_task(self._spawn())
        server.crash()
        self._crash_at = time.monotonic()
        self.report.killed.append(server.env["QUIESCE_WORKER_ID"])
        self._up.append(await replacement)
        return held

    # --- the clients ----------------------------------------------------------------

    async def _create_loop(self) -> None:
        body = {
            "task": "sleep",
            "input": {"seconds": self._run_seconds, "steps": 3},
            "retry": {"max_attempts": self._max_attempts},
        }
        turn = itertools.count()
        async with httpx.AsyncClient(timeout=5) as http:
            while self._creating:
                await self._create(http, body, turn)
                await asyncio.sleep(self._interval)

    async def _create(self, http: httpx.AsyncClient, body: dict[str, Any], turn: Any) -> None:
        for _ in range(20):
            servers = list(self._up)
            server = servers[next(turn) % len(servers)]
            try:
                response = await http.post(f"{server.url}/v1/runs", json=body)
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 202:
                self._run_ids.append(response.json()["run_id"])
                return
            self.report.creates_refused += 1
            await asyncio.sleep(0.05)
        raise AssertionError("no replica accepted a create 20 times in a row")

    # --- reading back -----------------------------------------------------------------

    async def _wait_all_terminal(self, crashed: list[str]) -> None:
        # Bounded: lease (3 s) + reaper tick + run time + adoption, with room to spare.
        deadline = time.monotonic() + 60
        pending = set(self._run_ids)
        crashed_left = set(crashed)
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} runs never ended"
            for run_id in list(pending):
                record = await self._store.get(run_id)
                if record is not None and record.is_terminal:
                    pending.discard(run_id)
                    crashed_left.discard(run_id)
            if not crashed_left and self.report.crash_recovery_seconds is None:
                self.report.crash_recovery_seconds = round(time.monotonic() - self._crash_at, 2)
            await asyncio.sleep(0.2)
        if self.report.crash_recovery_seconds is None:
            self.report.crash_recovery_seconds = round(time.monotonic() - self._crash_at, 2)

    async def _outcome(self, run_id: str) -> RunOutcome:
        record = await self._store.get(run_id)
        events = await self._store.events(run_id, after=None, limit=1000)
        assert record is not None
        assert events is not None
        history: list[tuple[str, int | None, str | None]] = []
        for event in events:
            kind = event_type(event)
            data = msgspec.to_builtins(event.data)
            if kind == "run_started":
                history.append((kind, data["attempt"], data["worker_id"]))
            elif kind == "run_requeued":
                history.append((kind, data["attempt"], data["reason"]))
            elif kind != "run_progress":
                history.append((kind, None, data.get("reason")))
        return RunOutcome(
            run_id=run_id,
            status=record.status,
            reason=None if record.error is None else record.error.reason,
            attempt=record.attempt,
            history=history,
        )
