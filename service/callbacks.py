"""Completion callbacks: when a run ends, POST it to the ``callback_url`` it was created with.

The body is a Standard Webhooks payload, ``{"type": "run.<status>", "timestamp": ...,
"data": <run record>}``, with ``webhook-id`` (the run id, the same on every attempt,
so the receiver can drop duplicates), ``webhook-timestamp`` and, when
``QUIESCE_CALLBACK_SECRET`` is set, ``webhook-signature``.

Delivery is at least once while the process lives: a 2xx answer is delivered; a
connection error, a timeout, 408, 429 or a 5xx is retried; any other answer fails at
once. Retries wait with exponential backoff and full jitter (a random time between 0
and 1 s, 2 s, 4 s, ... at most ``MAX_BACKOFF_SECONDS``), so receivers that fail
together are not hit again together; a ``Retry-After`` answer (seconds or an
HTTP-date) is waited instead, up to ``MAX_RETRY_AFTER_SECONDS``. A delivery gives up
after ``ATTEMPTS`` attempts or when the next attempt would start after its deadline
(``DELIVERY_DEADLINE_SECONDS`` from the run's end), whichever comes first.

Every delivery ends exactly once, logged and counted in ``quiesce_callbacks_total``
(``delivered`` or ``failed``), whatever happens, including a URL that can no longer be
parsed and an unexpected error: a delivery task never ends with an exception that
nobody retrieves. The target must pass the same egress policy as the ``http`` task,
checked when the run is created and again before each attempt. Deliveries still
pending when the process stops get what is left of the drain's time budget
(``close(within=...)``), then are abandoned as ``failed`` — the run record itself is
final either way, so a receiver that missed a callback can read it.

Why not a retry library: stamina (on Tenacity) adds its jitter on top of a fixed
exponential delay rather than drawing the whole delay at random, does not shorten a
wait to fit an overall deadline (an attempt can start after it), retries on raised
exceptions only (each non-2xx answer would have to become one), and registers its
own metrics and log hooks globally. The loop below is shorter than that glue.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
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

#: At most this many attempts per delivery.
ATTEMPTS: Final = 5
#: The first retry waits up to this long; each later one up to twice the one before.
FIRST_RETRY_SECONDS: Final = 1.0
#: No backoff is longer than this.
MAX_BACKOFF_SECONDS: Final = 30.0
#: A receiver's ``Retry-After`` is honoured up to this long (a longer one waits this).
MAX_RETRY_AFTER_SECONDS: Final = 60.0
#: No attempt starts later than this after the delivery began.
DELIVERY_DEADLINE_SECONDS: Final = 120.0
#: One attempt's time limit (shortened to what is left before the deadline).
ATTEMPT_TIMEOUT_SECONDS: Final = 10.0
_RETRY_STATUSES: Final = frozenset({408, 429})
_DELAY_SECONDS_RE: Final = re.compile(r"[0-9]+")


class CallbackPayload(msgspec.Struct, kw_only=True, frozen=True):
    type: str
    timestamp: datetime | None
    data: RunRecord


_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one attempt came to."""

    #: None when delivered.
    problem: str | None
    retry: bool = False
    #: What the receiver's Retry-After asked for, in seconds (before the cap).
    retry_after: float | None = None


_DELIVERED: Final = _Outcome(problem=None)


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
        max_backoff_seconds: float = MAX_BACKOFF_SECONDS,
        max_retry_after_seconds: float = MAX_RETRY_AFTER_SECONDS,
        deadline_seconds: float = DELIVERY_DEADLINE_SECONDS,
    ) -> None:
        self._http = http
        self._policy = policy
        self._key = key
        self._metrics = metrics
        self._attempts = attempts
        self._first_retry = first_retry_seconds
        self._max_backoff = max_backoff_seconds
        self._max_retry_after = max_retry_after_seconds
        self._deadline = deadline_seconds
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

    def backoff(self, attempt: int) -> float:
        """Full jitter: a random wait up to the exponential bound after ``attempt``."""
        bound = min(self._max_backoff, self._first_retry * 2 ** min(attempt - 1, 60))
        return random.uniform(0.0, bound)  # noqa: S311 - spreading retries, not a secret

    async def _deliver(self, record: RunRecord, url: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._deadline
        bound = log.bind(run_id=record.run_id, callback_host=_host_of(url))
        problem: str | None = "not attempted before shutdown"
        try:
            body = _encoder.encode(
                CallbackPayload(
                    type=f"run.{record.status}", timestamp=record.finished_at, data=record
                )
            )
            for attempt in range(1, self._attempts + 1):
                remaining = deadline - loop.time()
                outcome = await self._attempt(
                    record.run_id, url, body, time_limit=min(ATTEMPT_TIMEOUT_SECONDS, remaining)
                )
                problem = outcome.problem
                if problem is None:
                    bound.info("callback_delivered", attempt=attempt)
                    return
                if not outcome.retry:
                    return
                if attempt == self._attempts:
                    problem = f"{problem} (attempt {attempt} of {self._attempts})"
                    return
                if outcome.retry_after is not None:
                    delay = min(outcome.retry_after, self._max_retry_after)
                else:
                    delay = self.backoff(attempt)
                if loop.time() + delay >= deadline:
                    problem = (
                        f"{problem} (attempt {attempt}; the next would start after the "
                        f"{self._deadline:g} s delivery deadline)"
                    )
                    return
                bound.info(
                    "callback_retrying", attempt=attempt, problem=problem, retry_in=round(delay, 3)
                )
                await asyncio.sleep(delay)
        except Exception as exc:  # fire and forget: an error must end here, counted
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            # Also when abandoned at shutdown (cancelled): every delivery is counted once.
            self._metrics.callbacks.labels("delivered" if problem is None else "failed").inc()
            if problem is not None:
                bound.error("callback_failed", problem=problem)

    async def _attempt(self, message_id: str, url: str, body: bytes, time_limit: float) -> _Outcome:
        try:
            target = await self._policy.pin(url)
        except EgressRefused as exc:
            return _Outcome(problem=str(exc))
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
                timeout=max(time_limit, 0.001),
                extensions=target.extensions,
            )
        except httpx.HTTPError as exc:
            return _Outcome(problem=f"{type(exc).__name__}: {exc}", retry=True)
        if response.is_success:
            return _DELIVERED
        status = response.status_code
        if not (status >= 500 or status in _RETRY_STATUSES):
            return _Outcome(problem=f"answered {status}")
        retry_after = retry_after_seconds(response.headers.get("retry-after"), now=time.time())
        return _Outcome(problem=f"answered {status}", retry=True, retry_after=retry_after)


def retry_after_seconds(value: str | None, *, now: float) -> float | None:
    """A ``Retry-After`` header as seconds from ``now`` (never negative); None when it
    is missing or neither a number of seconds nor an HTTP-date."""
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS_RE.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": an HTTP-date is always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _host_of(url: str) -> str:
    """What a log line may say about a callback URL: its host (a query may hold a token)."""
    try:
        return httpx.URL(url).host or "?"
    except (httpx.InvalidURL, ValueError, TypeError):
        return "?"
