"""Connection limits that keep a replica answering while clients hold requests open.

Granian admits a fixed number of concurrent requests per worker (its backpressure,
set by ``quiesce serve``); once that many are held open, nothing else is answered —
the kubelet's probes included. Two kinds of request can be held open at a client's
will, and each is bounded here:

* **event streams** (any handler answering ``text/event-stream``): at most
  ``QUIESCE_MAX_STREAMS`` per process; one more gets ``503`` + ``Retry-After``
  before it touches the store. The rest of Granian's backpressure stays free for
  everything else (see ``service.cli.granian_backpressure``).
* **request bodies**: a body must have arrived ``QUIESCE_REQUEST_BODY_TIMEOUT_SECONDS``
  after the request started, else ``408`` (Granian has no body timeout of its own), so
  a body sent a byte at a time frees its slot within that time.

One app-level middleware does both; it runs inside the HTTP metrics middleware, so
its refusals are counted like any other answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

from service.metrics import Metrics
from service.web.errors import send_error

#: A refused stream is told to come back after this long; streams end all the time.
STREAM_RETRY_AFTER_SECONDS: Final = 5
STREAM_MEDIA_TYPE: Final = "text/event-stream"
#: How often overdue request bodies are looked for (a deadline may be overrun by this).
SWEEP_SECONDS: Final = 0.25


class RequestBodyTimeout(HTTPException):
    """The request body did not arrive in time (408).

    Raised from ``receive`` inside the handler, so Litestar's exception handling
    renders it in the usual error shape. ``Connection: close``: the rest of the body
    may still be on its way, and it must not be read as the next request.
    """

    status_code = 408


class StreamBudget:
    """How many event streams are open in this process, and the most allowed."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.open = 0
        self._metrics = metrics
        metrics.max_streams.set(limit)

    def acquire(self) -> bool:
        if self.open >= self.limit:
            self._metrics.streams_rejected.inc()
            return False
        self.open += 1
        self._metrics.streams_active.set(self.open)
        return True

    def release(self) -> None:
        self.open -= 1
        self._metrics.streams_active.set(self.open)


def connection_limits(
    *, max_streams: int, body_timeout_seconds: float, metrics: Metrics
) -> Callable[[ASGIApp], ASGIApp]:
    """The middleware factory for ``Litestar(middleware=[...])``; one budget per app."""
    budget = StreamBudget(max_streams, metrics)
    watchdog = BodyWatchdog(body_timeout_seconds, metrics)

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            receive = watchdog.bounded(receive)
            handler = scope.get("route_handler")
            if getattr(handler, "media_type", None) != STREAM_MEDIA_TYPE:
                await app(scope, receive, send)
                return
            if not budget.acquire():
                await _refuse_stream(send, budget.limit)
                return
            try:
                await app(scope, receive, send)
            finally:
                budget.release()

        return middleware

    return factory


class _Waiting:
    """A request whose ``receive`` is waiting for more of its body."""

    __slots__ = ("deadline", "expired", "task")

    def __init__(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.expired = False


class BodyWatchdog:
    """Gives up on request bodies that do not arrive in time.

    A timer per request (``asyncio.timeout``) would cost every request a timer
    handle in the loop's heap. Instead, a request is listed only while its
    ``receive`` actually waits, and one sweep every ``SWEEP_SECONDS`` (scheduled
    only while something is listed) cancels the receives past their deadline; the
    cancelled ``receive`` turns that into a 408. A deadline may be overrun by up to
    one sweep period.
    """

    def __init__(self, timeout: float, metrics: Metrics) -> None:
        self.timeout = timeout
        self._metrics = metrics
        self._waiting: dict[int, _Waiting] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._next_key = 0

    def bounded(self, receive: Receive) -> Receive:
        """``receive`` that gives up on the body ``timeout`` seconds from now.

        Only the body is bounded: once its last chunk has arrived, later calls (a
        stream waiting for the client to disconnect) wait as long as they like.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        body_done = False

        async def timed_receive() -> ReceiveMessage:
            nonlocal body_done
            if body_done:
                return await receive()
            key = self._watch(loop, deadline)
            try:
                message = await receive()
            except asyncio.CancelledError:
                waiting = self._waiting.pop(key, None)
                if waiting is not None and waiting.expired and waiting.task.uncancel() == 0:
                    raise self._timed_out() from None
                raise
            self._waiting.pop(key, None)
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        return timed_receive

    def _watch(self, loop: asyncio.AbstractEventLoop, deadline: float) -> int:
        task = asyncio.current_task()
        assert task is not None
        key = self._next_key
        self._next_key = key + 1
        self._waiting[key] = _Waiting(task, deadline)
        if self._sweeper is None:
            self._sweeper = loop.call_at(
                min(deadline, loop.time() + SWEEP_SECONDS), self._sweep, loop
            )
        return key

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = None
        if not self._waiting:
            return
        now = loop.time()
        for waiting in self._waiting.values():
            if not waiting.expired and waiting.deadline <= now:
                waiting.expired = True
                waiting.task.cancel()
        self._sweeper = loop.call_at(now + SWEEP_SECONDS, self._sweep, loop)

    def _timed_out(self) -> RequestBodyTimeout:
        self._metrics.request_body_timeouts.inc()
        return RequestBodyTimeout(
            detail=f"the request body did not arrive within {self.timeout:g}s",
            headers={"Connection": "close"},
        )


async def _refuse_stream(send: Send, limit: int) -> None:
    await send_error(
        send,
        503,
        f"this replica already serves its maximum of {limit} event streams; retry later",
        (b"retry-after", str(STREAM_RETRY_AFTER_SECONDS).encode()),
    )
