"""Admission, execution and finalization of runs in this process; and the drain.

The scheduler is the core: it receives the store, the task registry, the shared
HTTP client and a clock, and does no I/O of its own beyond calling them. Its
rules:

* **Admission** is one synchronous check-and-reserve: refuse while draining
  (Draining → 503) or at ``max_active_runs`` (AtCapacity → 429), else reserve a
  slot. No ``await`` separates the check from the reservation, which is what makes
  it atomic under asyncio — a lock would add nothing, and holding one across the
  store write would serialize every create. The record is then persisted, and only
  then is the task started; a reservation counts as active from the start, so a
  drain that begins mid-admission still waits for (or cancels) that run.
* **Supervision**: each run has one supervisor task that runs the task function,
  enforces the deadline, reacts to cancel requests, and finalizes the run exactly
  once through the store's compare-and-set. The outcome is decided in one place:
  if the task function has finished, its result stands; otherwise the first reason
  to stop it (user cancel, shutdown, timeout) does. The run's progress events go
  through its outbox (``service.progress``), which is flushed before the terminal
  write; the write itself, and what follows it, is ``service.finish``.
* **Drain**: refuse new runs at once (``begin_drain``, synchronous), wait up to the
  grace for active runs, cancel the rest as ``failed``/``shutdown``, and return only
  when every run of this process has been written terminal (or the bounded
  finalization budget is spent).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import gc
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import httpx
import msgspec
import structlog

from service.errors import (
    AtCapacity,
    Draining,
    IdempotencyInProgress,
    IdempotencyMismatch,
    StoreUnavailable,
)
from service.finish import Finisher
from service.metrics import Metrics
from service.progress import ProgressOutbox
from service.schemas import (
    CreateRunRequest,
    RunError,
    RunRecord,
    RunStarted,
    RunStartedData,
    RunStatus,
    request_fingerprint,
    utcnow,
)
from service.store.base import CancelOutcome, RunStore
from service.tasks.base import RunContext, Task, TaskRegistry

log = structlog.get_logger(__name__)

CancelReason = Literal["user", "shutdown", "timeout"]

#: How long a cancelled task function gets to unwind before its run is finalized
#: anyway (a task that swallows CancelledError is left behind, and logged).
CANCEL_WAIT_SECONDS: Final = 0.5
#: After the grace: the most a drain spends cancelling and writing what is left.
#: With the server's own stop (about 0.2 s) this keeps "drain start to exit" within
#: grace + 2 s; bench/drain_timing.py shows 5,000 runs written in about 1.3 s.
DRAIN_FINALIZE_BUDGET_SECONDS: Final = 1.5

_OUTCOME_MESSAGES: Final[dict[CancelReason, tuple[RunStatus, str]]] = {
    # reason → (status, message)
    "user": ("cancelled", "cancelled by request"),
    "shutdown": ("failed", "the worker shut down before the run finished"),
    "timeout": ("failed", "the run exceeded its timeout"),
}


def new_run_id() -> str:
    return "run_" + _b32(secrets.token_bytes(16))


#: Where an idempotency key comes from: a client's ``Idempotency-Key`` header, or the
#: ``webhook-id`` of a signed create. Each has its own hash domain, so no text a client
#: sends can name a webhook's run (or the reverse).
KeyNamespace = Literal["client", "webhook"]
_KEY_DOMAINS: Final[dict[str, bytes]] = {
    "client": b"quiesce-idempotency:",
    "webhook": b"quiesce-webhook-id:",
}


def run_id_for_key(idempotency_key: str, namespace: KeyNamespace = "client") -> str:
    """The run id an idempotency key maps to, so the key lives with the run's keys."""
    return "run_" + _b32(
        hashlib.sha256(_KEY_DOMAINS[namespace] + idempotency_key.encode()).digest()
    )


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()[:26]


@dataclass(frozen=True, slots=True)
class Admission:
    """The record a create answers with; ``replayed`` for an idempotent repeat."""

    record: RunRecord
    replayed: bool


@dataclass(eq=False)
class _ActiveRun:
    record: RunRecord
    task: Task[Any]
    params: msgspec.Struct
    admitted_at: float
    deadline: float
    #: Its progress events not yet written.
    outbox: ProgressOutbox
    cancel_reason: CancelReason | None = None
    #: Resolved by a cancel request, to wake the supervisor.
    wake: asyncio.Future[None] | None = None
    supervisor: asyncio.Task[None] | None = None
    #: The terminal record once decided, before it is written.
    outcome: RunRecord | None = None
    #: Of the create request, when it came with an idempotency key.
    fingerprint: str | None = None
    #: The terminal write has been answered (won or lost); nothing more to write.
    settled: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def run_id(self) -> str:
        return self.record.run_id


@dataclass
class DrainProgress:
    started_at: datetime
    grace_seconds: float
    active_at_start: int
    cancelled: int = 0
    finished: bool = False


class Scheduler:
    def __init__(
        self,
        *,
        store: RunStore,
        registry: TaskRegistry,
        metrics: Metrics,
        http: httpx.AsyncClient,
        worker_id: str,
        max_active_runs: int,
        default_timeout_seconds: float,
        now: Callable[[], datetime] = utcnow,
        on_finished: Callable[[RunRecord], None] | None = None,
    ) -> None:
        self._store = store
        self._finisher = Finisher(store=store, metrics=metrics, on_finished=on_finished, now=now)
        self._registry = registry
        self._metrics = metrics
        self._http = http
        self._worker_id = worker_id
        self._max_active = max_active_runs
        self._default_timeout = default_timeout_seconds
        self._now = now
        self._runs: dict[str, _ActiveRun] = {}
        self._draining = False
        self._drain_task: asyncio.Task[DrainProgress] | None = None
        self.drain_progress: DrainProgress | None = None
        self._background: set[asyncio.Task[Any]] = set()
        #: After a drain: runs whose terminal write could not be made in time.
        self.left_running: list[str] = []
        store.listen_for_cancels(worker_id, self)

    # --- state ----------------------------------------------------------------------

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def max_active_runs(self) -> int:
        return self._max_active

    def active_runs(self) -> list[tuple[RunRecord, float]]:
        """(record, age in seconds) of every run this process holds, oldest first."""
        now = asyncio.get_running_loop().time()
        return [(run.record, now - run.admitted_at) for run in self._runs.values()]

    # --- admission ------------------------------------------------------------------

    async def create(
        self,
        request: CreateRunRequest,
        *,
        idempotency_key: str | None = None,
        key_namespace: KeyNamespace = "client",
    ) -> Admission:
        """Admit, persist and start a run (see the module docstring for the order)."""
        task = self._registry.get(request.task)
        params = task.parse_input(request.input)
        fingerprint = None if idempotency_key is None else request_fingerprint(request)
        if idempotency_key is None:
            run_id = new_run_id()
        else:
            run_id = run_id_for_key(idempotency_key, key_namespace)
            if (local := self._runs.get(run_id)) is not None:
                return self._replay_local(local, fingerprint)
        active = self._reserve(run_id, task, params, request)
        active.fingerprint = fingerprint
        claimed = False
        token = secrets.token_hex(8)
        try:
            if fingerprint is not None:
                original = await self._store.claim_idempotency(run_id, fingerprint, token)
                if original is not None:
                    self._release(active)
                    return Admission(record=original, replayed=True)
                claimed = True
            started = RunStarted(
                created_at=active.record.created_at,
                data=RunStartedData(worker_id=self._worker_id),
            )
            await self._store.create(active.record, started)
        except BaseException:
            self._release(active)
            if claimed:
                self._spawn(self._store.release_idempotency(run_id, token))
            raise
        self._start(active)
        return Admission(record=active.record, replayed=False)

    @staticmethod
    def _replay_local(local: _ActiveRun, fingerprint: str | None) -> Admission:
        """The same key again while its run is held here: one entry per run id."""
        if local.fingerprint != fingerprint:
            raise IdempotencyMismatch("the idempotency key was used with a different request body")
        if local.supervisor is None:
            raise IdempotencyInProgress("a request with this idempotency key is being admitted")
        return Admission(record=local.record, replayed=True)

    def _reserve(
        self, run_id: str, task: Task[Any], params: msgspec.Struct, request: CreateRunRequest
    ) -> _ActiveRun:
        if self._draining:
            raise Draining("this replica is draining and admits no new runs")
        if len(self._runs) >= self._max_active:
            raise AtCapacity(
                f"this replica is at its limit of {self._max_active} active runs",
                max_active_runs=self._max_active,
            )
        timeout = request.timeout_seconds or self._default_timeout
        now = self._now()
        record = RunRecord(
            run_id=run_id,
            task=task.name,
            status="running",
            created_at=now,
            updated_at=now,
            worker_id=self._worker_id,
            metadata=request.metadata,
            timeout_seconds=timeout,
            callback_url=request.callback_url,
        )
        loop_now = asyncio.get_running_loop().time()
        active = _ActiveRun(
            record=record,
            task=task,
            params=params,
            admitted_at=loop_now,
            deadline=loop_now + timeout,
            outbox=ProgressOutbox(self._store, run_id, deadline=loop_now + timeout, now=self._now),
        )
        self._runs[run_id] = active
        self._metrics.active_runs.set(len(self._runs))
        return active

    def _release(self, active: _ActiveRun) -> None:
        if self._runs.get(active.run_id) is active:
            del self._runs[active.run_id]
            self._metrics.active_runs.set(len(self._runs))
        active.done.set()

    def _start(self, active: _ActiveRun) -> None:
        self._metrics.runs_started.labels(active.task.name).inc()
        # A fresh context: the run must not inherit the request's bound log context.
        active.supervisor = asyncio.create_task(
            self._supervise(active),
            name=f"quiesce-run-{active.run_id}",
            context=contextvars.Context(),
        )

    # --- supervision ----------------------------------------------------------------

    async def _supervise(self, active: _ActiveRun) -> None:
        structlog.contextvars.bind_contextvars(run_id=active.run_id, task=active.task.name)
        log.info("run_started", timeout_seconds=active.record.timeout_seconds)
        try:
            active.outcome = await self._execute(active)
            # Every progress event accepted so far goes first: the terminal one is last.
            await active.outbox.close()
            await self._finisher.finish(active.outcome, retry=True)
            active.settled = True
        finally:
            if active.settled:  # (a drain that cancelled this supervisor writes the run)
                active.outbox.abandon()
            self._release(active)

    async def _execute(self, active: _ActiveRun) -> RunRecord:
        """Run the task function; return the terminal record its ending calls for."""
        if active.cancel_reason is not None:  # cancelled while being admitted
            return self._stopped_record(active, active.cancel_reason)
        loop = asyncio.get_running_loop()
        context = RunContext(
            run_id=active.run_id,
            emit=active.outbox.emit,
            http=self._http,
            log=log,
            deadline=active.record.created_at + timedelta(seconds=active.record.timeout_seconds),
        )
        work: asyncio.Task[Any] = asyncio.create_task(active.task.fn(context, active.params))
        active.wake = loop.create_future()
        try:
            await asyncio.wait(
                [work, active.wake],
                timeout=max(0.0, active.deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            work.cancel()
            raise
        if work.done():
            return self._finished_record(active, work)
        reason: CancelReason = active.cancel_reason or "timeout"
        active.cancel_reason = reason
        self._metrics.run_cancellations.labels(active.task.name, reason).inc()
        log.info("run_cancelling", reason=reason)
        work.cancel()
        await asyncio.wait([work], timeout=CANCEL_WAIT_SECONDS)
        if not work.done():
            log.warning("task_ignored_cancellation", waited_seconds=CANCEL_WAIT_SECONDS)
        return self._stopped_record(active, reason)

    def _finished_record(self, active: _ActiveRun, work: asyncio.Task[Any]) -> RunRecord:
        if work.cancelled():
            return self._terminal(
                active, "failed", RunError(reason="error", message="CancelledError")
            )
        exc = work.exception()
        if exc is not None:
            log.warning("run_task_raised", exc_info=exc)
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return self._terminal(active, "failed", RunError(reason="error", message=message))
        try:
            output = msgspec.to_builtins(work.result())
        except (TypeError, ValueError) as exc:
            message = f"the task returned a value that is not JSON: {exc}"
            return self._terminal(active, "failed", RunError(reason="error", message=message))
        return self._terminal(active, "succeeded", None, output=output)

    def _stopped_record(self, active: _ActiveRun, reason: CancelReason) -> RunRecord:
        status, message = _OUTCOME_MESSAGES[reason]
        if reason == "timeout":
            message = f"{message} of {active.record.timeout_seconds:g}s"
        failure = "cancelled" if reason == "user" else reason
        return self._terminal(active, status, RunError(reason=failure, message=message))

    def _terminal(
        self, active: _ActiveRun, status: RunStatus, error: RunError | None, output: Any = None
    ) -> RunRecord:
        now = self._now()
        return msgspec.structs.replace(
            active.record,
            status=status,
            updated_at=now,
            finished_at=now,
            output=output,
            error=error,
        )

    # --- cancellation ---------------------------------------------------------------

    async def cancel(self, run_id: str) -> CancelOutcome:
        """Request cancellation of a run wherever it runs (RunNotFound if none)."""
        outcome = await self._store.request_cancel(run_id)
        if outcome is CancelOutcome.REQUESTED:
            self.cancel_requested(run_id)  # ours? then no need to wait for the notification
        return outcome

    def cancel_requested(self, run_id: str) -> None:
        """CancelListener: a user cancel for a run of this worker."""
        self._cancel_local(run_id, "user")

    def resync(self) -> None:
        """CancelListener: notifications may have been missed; re-read the flags."""
        if self._runs:
            self._spawn(self._resync())

    async def _resync(self) -> None:
        try:
            flagged = await self._store.cancel_requested(list(self._runs))
        except StoreUnavailable:
            return  # the listener resyncs again after its next reconnect
        for run_id in flagged:
            self._cancel_local(run_id, "user")

    def _cancel_local(self, run_id: str, reason: CancelReason) -> None:
        active = self._runs.get(run_id)
        if active is None or active.cancel_reason is not None or active.outcome is not None:
            return
        active.cancel_reason = reason
        if active.wake is not None and not active.wake.done():
            active.wake.set_result(None)

    # --- drain ----------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Refuse new runs from now on. Synchronous, so it takes effect this loop turn."""
        if not self._draining:
            self._draining = True
            self._metrics.draining.set(1)

    def start_drain(self, grace_seconds: float) -> asyncio.Task[DrainProgress]:
        """Start the drain now (synchronously); a later call returns the same drain."""
        self.begin_drain()
        if self._drain_task is None:
            self.drain_progress = DrainProgress(
                started_at=self._now(), grace_seconds=grace_seconds, active_at_start=len(self._runs)
            )
            self._drain_task = asyncio.create_task(self._drain(self.drain_progress))
        return self._drain_task

    async def drain(self, grace_seconds: float) -> DrainProgress:
        """Drain once; later calls wait for the same drain (it is never restarted)."""
        return await asyncio.shield(self.start_drain(grace_seconds))

    async def _drain(self, progress: DrainProgress) -> DrainProgress:
        log.info("drain_started", active_runs=len(self._runs), grace_seconds=progress.grace_seconds)
        await self._wait_for_runs(progress.grace_seconds)
        if self._runs:
            await self._stop_leftovers(progress)
        progress.finished = True
        log.info(
            "drain_finished", cancelled=progress.cancelled, left_running=len(self.left_running)
        )
        return progress

    async def _wait_for_runs(self, within: float) -> None:
        waits = [asyncio.ensure_future(run.done.wait()) for run in self._runs.values()]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=within)
        for wait in pending:
            wait.cancel()

    async def _stop_leftovers(self, progress: DrainProgress) -> None:
        """After the grace: stop every run still here and write each one failed/shutdown,
        all at once, within DRAIN_FINALIZE_BUDGET_SECONDS.

        The writes go out together (the store batches them), not one supervisor at a
        time, so thousands of runs fit in the budget. A run whose supervisor is already
        writing its own outcome, or that is still being admitted, finishes on its own
        path (an admission that completes now finalizes as shutdown at once).
        """
        # A collection pass over thousands of runs' objects would eat the budget.
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self._write_leftovers(progress)
        finally:
            if collecting:
                gc.enable()

    async def _write_leftovers(self, progress: DrainProgress) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_FINALIZE_BUDGET_SECONDS
        leftovers = list(self._runs.values())
        log.info("drain_cancelling", runs=len(leftovers))
        stopping: list[tuple[_ActiveRun, RunRecord]] = []
        for active in leftovers:
            if active.outcome is not None:
                continue  # its supervisor is writing it
            if active.cancel_reason is None:  # (else a cancel or timeout was under way)
                active.cancel_reason = "shutdown"
                self._metrics.run_cancellations.labels(active.task.name, "shutdown").inc()
                progress.cancelled += 1
            if active.supervisor is None:
                continue  # being admitted: it finalizes as soon as it starts
            record = active.outcome = self._stopped_record(active, active.cancel_reason)
            active.supervisor.cancel()  # it cancels the task function and frees the slot
            stopping.append((active, record))
        # Progress the runs emitted before they were stopped is written first (usually
        # nothing is pending); half the budget at most, the rest is for the writes.
        flushes = [
            asyncio.ensure_future(active.outbox.close())
            for active, _ in stopping
            if active.outbox.pending
        ]
        if flushes:
            _, late = await asyncio.wait(flushes, timeout=(deadline - loop.time()) / 2)
            for flush in late:
                flush.cancel()  # (the sender goes on until the terminal write is made)
        answers = await self._finisher.finish_many(
            [record for _, record in stopping], within=deadline - loop.time()
        )
        for (active, _), answer in zip(stopping, answers, strict=True):
            active.settled = answer is not None
        await self._wait_for_runs(max(0.0, deadline - loop.time()))
        for active in leftovers:
            if active.supervisor is not None and not active.supervisor.done():
                active.supervisor.cancel()
            active.outbox.abandon()
        self.left_running = [a.run_id for a in leftovers if not a.settled]
        if self.left_running:
            log.error(
                "runs_left_running",
                count=len(self.left_running),
                run_ids=self.left_running[:20],
                detail="their terminal write did not complete in time; once this worker's "
                "lease expires, a peer records them as worker_lost",
            )

    # --- internals ------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
