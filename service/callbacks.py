"""Completion callbacks: when a run ends, POST it to the ``callback_url`` it was created with.

The body is a Standard Webhooks payload, ``{"type": "run.<status>", "timestamp": ...,
"data": <run record>}``, with ``webhook-id`` (the run id, the same on every attempt,
so the receiver can drop duplicates), ``webhook-timestamp`` and, when
``QUIESCE_CALLBACK_SECRET`` is set, ``webhook-signature``.

Delivery is at least once while the process lives: a 2xx answer is delivered; a
connection error, a timeout, 408, 429 or a 5xx is retried with exponential backoff;
any other answer fails at once. Every outcome is logged and counted in
``quiesce_callbacks_total``. The target must pass the same egress policy as the
``http`` task, checked when the run is created and again before each attempt.
Deliveries still pending when the process stops get what is left of the drain's
time budget, then are abandoned as ``failed`` — the run record itself is final
either way, so a receiver that missed a callback can read it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Final

import httpx
import msgspec
import structlog

from service.egress import EgressPolicy, EgressRefused
from service.errors import InvalidInput
from service.metrics import Metrics
from service.schemas import RunRecord
from service.webhooks import WebhookKey

log = structlog.get_logger(__name__)

ATTEMPTS: Final = 5
FIRST_RETRY_SECONDS: Final = 1.0
ATTEMPT_TIMEOUT_SECONDS: Final = 10.0
_RETRY_STATUSES: Final = frozenset({408, 429})


class CallbackPayload(msgspec.Struct, kw_only=True, frozen=True):
    type: str
    timestamp: datetime | None
    data: RunRecord


_encoder: Final = msgspec.json.Encoder()


class CallbackSender:
    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        policy: EgressPolicy,
        key: WebhookKey | None,
        metrics: Metrics,
        attempts: int = ATTEMPTS,
        first_retry_seconds: float = FIRST_RETRY_SECONDS,
    ) -> None:
        self._http = http
        self._policy = policy
        self._key = key
        self._metrics = metrics
        self._attempts = attempts
        self._first_retry = first_retry_seconds
        self._pending: set[asyncio.Task[None]] = set()

    def check(self, url: str) -> None:
        """Admission: refuse a callback URL the egress policy does not allow."""
        try:
            self._policy.check_url(url)
        except EgressRefused as exc:
            raise InvalidInput(f"{exc} - at `$.callback_url`", field="callback_url") from None

    def send(self, record: RunRecord) -> None:
        """Start delivering the terminal ``record`` if it has a callback URL."""
        if record.callback_url is None:
            return
        task = asyncio.create_task(self._deliver(record, record.callback_url))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self, within: float) -> None:
        """Let pending deliveries finish for ``within`` seconds, then abandon them."""
        if not self._pending:
            return
        _, abandoned = await asyncio.wait(set(self._pending), timeout=max(within, 0.0))
        for task in abandoned:
            task.cancel()
        if abandoned:
            await asyncio.wait(abandoned)

    async def _deliver(self, record: RunRecord, url: str) -> None:
        body = _encoder.encode(
            CallbackPayload(type=f"run.{record.status}", timestamp=record.finished_at, data=record)
        )
        bound = log.bind(run_id=record.run_id, callback_url=url)
        delay = self._first_retry
        problem: str | None = "not attempted before shutdown"
        try:
            for attempt in range(1, self._attempts + 1):
                problem, retry = await self._attempt(record.run_id, url, body)
                if problem is None:
                    bound.info("callback_delivered", attempt=attempt)
                    return
                if not retry or attempt == self._attempts:
                    return
                bound.info("callback_retrying", attempt=attempt, problem=problem, retry_in=delay)
                await asyncio.sleep(delay)
                delay *= 2
        finally:
            # Also when abandoned at shutdown (cancelled): every callback is counted.
            outcome = "delivered" if problem is None else "failed"
            self._metrics.callbacks.labels(outcome).inc()
            if problem is not None:
                bound.error("callback_failed", problem=problem)

    async def _attempt(self, message_id: str, url: str, body: bytes) -> tuple[str | None, bool]:
        """(problem or None, worth retrying)."""
        try:
            target = await self._policy.pin(url)
        except EgressRefused as exc:
            return str(exc), False
        headers = {"content-type": "application/json", "webhook-id": message_id, **target.headers}
        timestamp = int(time.time())
        headers["webhook-timestamp"] = str(timestamp)
        if self._key is not None:
            headers["webhook-signature"] = self._key.sign(message_id, timestamp, body)
        try:
            response = await self._http.post(
                target.url,
                content=body,
                headers=headers,
                timeout=ATTEMPT_TIMEOUT_SECONDS,
                extensions=target.extensions,
            )
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}", True
        if response.is_success:
            return None, False
        status = response.status_code
        return f"answered {status}", status >= 500 or status in _RETRY_STATUSES
