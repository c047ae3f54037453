"""Admission: check, reserve, persist — and only then start the run.

A create is validated (the task exists, its input parses), reserved in the table of
active runs (refused while draining or at capacity, in the same event-loop turn as
the check), its idempotency key claimed, and its record and ``run_started`` event
written. Only then does supervision start it. A reservation counts as active from
the start, so a drain that begins mid-admission still waits for (or stops) that run.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import msgspec

from service.errors import IdempotencyInProgress, IdempotencyMismatch
from service.progress import ProgressOutbox
from service.runs.active import ActiveRun, ActiveRuns
from service.runs.supervision import Supervisor
from service.schemas import (
    CreateRunRequest,
    RunRecord,
    RunStarted,
    RunStartedData,
    request_fingerprint,
    utcnow,
)
from service.store.base import RunStore
from service.tasks.base import Task, TaskRegistry

#: Maps each byte to a base32 letter by its low five bits (256 is a multiple of 32,
#: so each letter is equally likely): 26 random bytes become an id in one C call.
_RANDOM_ID_LETTERS: Final = bytes(b"abcdefghijklmnopqrstuvwxyz234567"[b & 31] for b in range(256))


def new_run_id() -> str:
    """``run_`` and 26 random base32 letters (130 bits)."""
    return "run_" + os.urandom(26).translate(_RANDOM_ID_LETTERS).decode()


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


class Admitter:
    def __init__(
        self,
        *,
        store: RunStore,
        registry: TaskRegistry,
        runs: ActiveRuns,
        supervisor: Supervisor,
        worker_id: str,
        default_timeout_seconds: float,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._registry = registry
        self._runs = runs
        self._supervisor = supervisor
        self._worker_id = worker_id
        self._default_timeout = default_timeout_seconds
        self._spawn = spawn
        self._now = now

    async def create(
        self,
        request: CreateRunRequest,
        *,
        idempotency_key: str | None = None,
        key_namespace: KeyNamespace = "client",
    ) -> Admission:
        task = self._registry.get(request.task)
        params = task.parse_input(request.input)
        fingerprint = None if idempotency_key is None else request_fingerprint(request)
        if idempotency_key is None:
            run_id = new_run_id()
        else:
            run_id = run_id_for_key(idempotency_key, key_namespace)
            if (local := self._runs.get(run_id)) is not None:
                return _replay_local(local, fingerprint)
        active = self._reserve(run_id, task, params, request)
        active.fingerprint = fingerprint
        claimed = False
        token = secrets.token_hex(8)
        try:
            if fingerprint is not None:
                original = await self._store.claim_idempotency(run_id, fingerprint, token)
                if original is not None:
                    self._runs.release(active)
                    return Admission(record=original, replayed=True)
                claimed = True
            started = RunStarted(
                created_at=active.record.created_at,
                data=RunStartedData(worker_id=self._worker_id),
            )
            # A run that may be retried keeps its input, for the replica that adopts it.
            kept = None if active.record.retry is None else request.input
            await self._store.create(active.record, started, input=kept)
        except BaseException:
            self._runs.release(active)
            if claimed:
                self._spawn(self._store.release_idempotency(run_id, token))
            raise
        self._supervisor.start(active)
        return Admission(record=active.record, replayed=False)

    def _reserve(
        self, run_id: str, task: Task[Any], params: msgspec.Struct, request: CreateRunRequest
    ) -> ActiveRun:
        timeout = request.timeout_seconds or self._default_timeout
        policy = request.retry or task.retry
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
            max_attempts=1 if policy is None else policy.max_attempts,
            retry=policy,
        )
        loop_now = asyncio.get_running_loop().time()
        active = ActiveRun(
            record=record,
            task=task,
            params=params,
            admitted_at=loop_now,
            deadline=loop_now + timeout,
            outbox=ProgressOutbox(self._store, run_id, deadline=loop_now + timeout, now=self._now),
        )
        self._runs.reserve(active)
        return active


def _replay_local(local: ActiveRun, fingerprint: str | None) -> Admission:
    """The same key again while its run is held here: one entry per run id."""
    if local.fingerprint != fingerprint:
        raise IdempotencyMismatch("the idempotency key was used with a different request body")
    if local.supervisor is None:
        raise IdempotencyInProgress("a request with this idempotency key is being admitted")
    return Admission(record=local.record, replayed=True)
