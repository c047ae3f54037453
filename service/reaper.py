"""Worker leases and the reaper: no run stays ``running`` after its worker is gone.

A drain finalizes every run of a stopping pod; a crash (SIGKILL, OOM kill, a lost
node) cannot. So every worker holds a lease in the store, renewed every third of
``QUIESCE_LEASE_TTL_SECONDS``, and every worker also reaps: twice per TTL it looks
for workers whose lease expired and finalizes each of their unfinished runs as
``failed`` with reason ``worker_lost`` — or, for a run whose retry policy lists
``worker_lost`` and has attempts left, requeues it for another replica to adopt.
Reapers on several replicas may race; the store's compare-and-set lets exactly one
write win, and only winners are counted in ``quiesce_orphans_reaped_total`` (and,
like every finalized run, by ``service.finish``: the run's metrics, its
``run_finished`` line, its callback).

A process also reaps its *own* worker id once at start: runs listed under it then
were left by an earlier process with the same id (a restarted container keeps its
hostname), since no live process shares a worker id. Worker ids must therefore be
unique among running processes — the pod name is.

The lease is renewed throughout a drain (which may outlast the TTL), and given up
only when the drain has finalized every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from datetime import datetime

import msgspec
import structlog

from service.errors import StoreUnavailable
from service.finish import Finisher
from service.metrics import Metrics
from service.schemas import RunError, RunRecord, utcnow
from service.store import RunStore

log = structlog.get_logger(__name__)


class Reaper:
    def __init__(
        self,
        *,
        store: RunStore,
        metrics: Metrics,
        worker_id: str,
        lease_ttl_seconds: float,
        now: Callable[[], datetime] = utcnow,
        on_finished: Callable[[RunRecord], None] | None = None,
        finisher: Finisher | None = None,
    ) -> None:
        self._store = store
        #: The process's one finish path (the scheduler's), when it has one.
        self._finisher = finisher or Finisher(
            store=store, metrics=metrics, on_finished=on_finished, now=now
        )
        self._metrics = metrics
        self._worker_id = worker_id
        self._ttl = lease_ttl_seconds
        self._now = now
        self._recovered = False
        #: Own orphans seen at the last check: reaped when seen twice in a row, so a
        #: create whose caller got a 503 is discarded by its undo first.
        self._suspects: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Reap what an earlier process with our id left, take the lease, keep it."""
        await self._tick(reap=False)
        self._task = asyncio.create_task(self._run(), name="quiesce-reaper")

    async def stop(self, *, retire: bool) -> None:
        """Stop renewing; ``retire`` gives the lease up (every run was finalized)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if retire:
            with contextlib.suppress(StoreUnavailable):
                await self._store.retire(self._worker_id)

    async def reap_expired(self) -> int:
        """Finalize the runs of every worker whose lease expired; how many this won."""
        won = 0
        for worker_id in await self._store.expired_workers():
            if worker_id != self._worker_id:  # our own lease lapsed while we were cut off
                won += await self._reap(worker_id, f"worker {worker_id} stopped renewing its lease")
        return won

    async def _run(self) -> None:
        beats = 0
        while True:
            # Jitter keeps the replicas of one rollout from reaping in lockstep.
            await asyncio.sleep(self._ttl / 3 * random.uniform(0.9, 1.0))  # noqa: S311
            beats += 1
            await self._tick(reap=beats % 2 == 0)

    async def _tick(self, *, reap: bool) -> None:
        try:
            if not self._recovered:
                message = f"worker {self._worker_id} restarted before the run finished"
                await self._reap(self._worker_id, message)
                self._recovered = True
            await self._store.heartbeat(self._worker_id, self._ttl)
            if reap:
                await self.reap_expired()
                await self._reap_own_orphans()
        except StoreUnavailable as exc:
            log.warning("lease_renewal_failed", error=str(exc))

    async def _reap_own_orphans(self) -> None:
        """Runs listed under this worker that it no longer executes and that still
        read ``running``: after a failover that lost their terminal write, nobody
        else would end them (this worker's lease never expires)."""
        suspects = set(await self._store.orphans(self._worker_id))
        confirmed = suspects & self._suspects
        self._suspects = suspects - confirmed
        if confirmed:
            message = f"worker {self._worker_id} no longer executes the run"
            await self._reap(self._worker_id, message, sorted(confirmed))

    async def _reap(self, worker_id: str, message: str, only: list[str] | None = None) -> int:
        run_ids = await self._store.runs_of(worker_id) if only is None else only
        won = 0
        for run_id in run_ids:
            record = await self._store.get(run_id)
            if record is None or record.is_terminal:
                continue
            if record.status == "queued":
                # Its requeue was cut short between its two steps (the run is queued
                # but may be in no queue): queue it (again; a second entry is harmless).
                await self._store.enqueue(record)
                continue
            if record.worker_id != worker_id:
                continue  # adopted by another worker since: listed here by mistake
            now = self._now()
            terminal = msgspec.structs.replace(
                record,
                status="failed",
                error=RunError(reason="worker_lost", message=message),
                updated_at=now,
                finished_at=now,
            )
            # (a run with a retry policy listing worker_lost is requeued instead)
            if await self._finisher.finish(terminal):
                won += 1
                self._metrics.orphans_reaped.inc()
                log.warning(
                    "run_reaped",
                    run_id=run_id,
                    task=record.task,
                    lost_worker=worker_id,
                    attempt=record.attempt,
                )
        await self._store.forget(worker_id, run_ids)
        return won
