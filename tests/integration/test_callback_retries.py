"""Callback delivery against a real HTTP receiver on loopback: jittered backoff,
``Retry-After``, the delivery deadline, the drain budget, and one count per delivery.

Timings are asserted only as lower bounds with wide margins (a retry can only be
late, never early); how long things take is not asserted.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from service.callbacks import CallbackSender, retry_after_seconds
from service.egress import EgressPolicy
from service.metrics import Metrics
from service.schemas import RunError, RunRecord, utcnow

RUN_ID = "run_" + "b" * 26


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    #: Wait this long before answering (to be abandoned at close).
    hold: float = 0.0


@dataclass
class Receiver:
    """An asyncio HTTP/1.1 server that answers each request with the next scripted
    answer (then 200) and records when each request arrived (loop time)."""

    answers: list[Answer] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=secret-in-query"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.arrivals.append(asyncio.get_running_loop().time())
            answer = self.answers.pop(0) if self.answers else Answer()
            if answer.hold:
                await asyncio.sleep(answer.hold)
            lines = [f"HTTP/1.1 {answer.status} X", "content-length: 0", "connection: close"]
            lines += [f"{k}: {v}" for k, v in answer.headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


def record(url: str) -> RunRecord:
    now = utcnow()
    return RunRecord(
        run_id=RUN_ID,
        task="sleep",
        status="failed",
        created_at=now,
        updated_at=now,
        finished_at=now,
        worker_id="w",
        timeout_seconds=1,
        callback_url=url,
        error=RunError(reason="error", message="boom"),
    )


@dataclass
class Delivery:
    metrics: Metrics
    logs: list[dict[str, Any]]

    def count(self, outcome: str) -> float:
        value: float = self.metrics.callbacks.labels(outcome)._value.get()
        return value

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs if line["event"] == name]


async def deliver(url: str, *, within: float = 10.0, **options: Any) -> Delivery:
    """Send one callback with ``options`` and wait for it (at most ``within``)."""
    metrics = Metrics(max_active_runs=1)
    options.setdefault("first_retry_seconds", 0.01)
    with capture_logs() as logs:
        async with httpx.AsyncClient() as http:
            sender = CallbackSender(
                http=http, policy=EgressPolicy(["127.0.0.1"]), key=None, metrics=metrics, **options
            )
            sender.send(record(url))
            await sender.close(within=within)
    return Delivery(metrics, logs)


async def test_a_2xx_counts_delivered_once(receiver: Receiver) -> None:
    delivery = await deliver(receiver.url)
    assert len(receiver.arrivals) == 1
    assert (delivery.count("delivered"), delivery.count("failed")) == (1, 0)
    assert len(delivery.events("callback_delivered")) == 1


async def test_retries_wait_a_jittered_backoff_within_its_bounds(receiver: Receiver) -> None:
    receiver.answers = [Answer(503)] * 4
    delivery = await deliver(receiver.url, first_retry_seconds=0.05, max_backoff_seconds=0.2)
    assert len(receiver.arrivals) == 5
    assert (delivery.count("delivered"), delivery.count("failed")) == (1, 0)
    waits = [line["retry_in"] for line in delivery.events("callback_retrying")]
    bounds = [0.05, 0.1, 0.2, 0.2]  # doubling, capped
    assert len(waits) == 4
    assert all(0 <= wait <= bound for wait, bound in zip(waits, bounds, strict=True)), waits
    assert len(set(waits)) > 1, waits  # random, not a fixed schedule
    gaps = [
        later - earlier
        for earlier, later in zip(receiver.arrivals[:-1], receiver.arrivals[1:], strict=True)
    ]
    assert all(gap >= wait - 0.01 for gap, wait in zip(gaps, waits, strict=True)), (gaps, waits)


def test_full_jitter_spreads_over_the_whole_range() -> None:
    sender = CallbackSender(
        http=httpx.AsyncClient(),
        policy=EgressPolicy([]),
        key=None,
        metrics=Metrics(max_active_runs=1),
        first_retry_seconds=1.0,
        max_backoff_seconds=30.0,
    )
    for attempt, bound in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (100, 30.0)]:
        waits = [sender.backoff(attempt) for _ in range(1000)]
        assert all(0 <= wait <= bound for wait in waits)
        # Not "exponential plus a little": short and long waits both occur.
        assert min(waits) < 0.1 * bound
        assert max(waits) > 0.9 * bound


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_is_honoured(receiver: Receiver, status: int) -> None:
    receiver.answers = [Answer(status, {"Retry-After": "1"})]
    delivery = await deliver(receiver.url)  # the backoff alone would wait at most 10 ms
    assert len(receiver.arrivals) == 2
    assert receiver.arrivals[1] - receiver.arrivals[0] >= 0.9
    assert delivery.events("callback_retrying")[0]["retry_in"] == 1
    assert (delivery.count("delivered"), delivery.count("failed")) == (1, 0)


async def test_retry_after_as_an_http_date_is_honoured(receiver: Receiver) -> None:
    loop_now = asyncio.get_running_loop().time()
    # Whole seconds only: two seconds ahead means more than one second from now.
    date = formatdate(time.time() + 2, usegmt=True)
    receiver.answers = [Answer(503, {"Retry-After": date})]
    delivery = await deliver(receiver.url)
    assert len(receiver.arrivals) == 2
    assert receiver.arrivals[1] - receiver.arrivals[0] >= 0.9
    assert receiver.arrivals[1] - loop_now >= 0.9
    assert (delivery.count("delivered"), delivery.count("failed")) == (1, 0)


async def test_a_long_retry_after_is_capped(receiver: Receiver) -> None:
    receiver.answers = [Answer(503, {"Retry-After": "3600"})]
    delivery = await deliver(receiver.url, max_retry_after_seconds=0.2, within=10)
    # Uncapped, the delivery would still be waiting when close() abandons it.
    assert len(receiver.arrivals) == 2
    assert delivery.events("callback_retrying")[0]["retry_in"] == 0.2
    assert (delivery.count("delivered"), delivery.count("failed")) == (1, 0)


async def test_the_deadline_stops_retrying_and_counts_failed_once(receiver: Receiver) -> None:
    receiver.answers = [Answer(503)] * 1000
    delivery = await deliver(
        receiver.url, attempts=1000, first_retry_seconds=0.05, deadline_seconds=0.5
    )
    assert 2 <= len(receiver.arrivals) < 1000
    assert (delivery.count("delivered"), delivery.count("failed")) == (0, 1)
    [failed] = delivery.events("callback_failed")
    assert "deadline" in failed["problem"]
    assert receiver.arrivals[-1] - receiver.arrivals[0] < 0.5  # no attempt after it


async def test_a_retry_after_beyond_the_deadline_ends_the_delivery(receiver: Receiver) -> None:
    receiver.answers = [Answer(429, {"Retry-After": "30"})]
    delivery = await deliver(receiver.url, deadline_seconds=5)
    assert len(receiver.arrivals) == 1
    assert (delivery.count("delivered"), delivery.count("failed")) == (0, 1)
    assert "deadline" in delivery.events("callback_failed")[0]["problem"]


async def test_the_drain_budget_abandons_a_pending_delivery_as_failed(
    receiver: Receiver,
) -> None:
    receiver.answers = [Answer(200, hold=30)]
    delivery = await deliver(receiver.url, within=0.3)
    assert len(receiver.arrivals) == 1
    assert (delivery.count("delivered"), delivery.count("failed")) == (0, 1)
    assert len(delivery.events("callback_failed")) == 1


async def test_no_log_line_carries_the_callback_query(receiver: Receiver) -> None:
    receiver.answers = [Answer(500)]
    delivery = await deliver(receiver.url)
    assert delivery.logs
    assert all("secret-in-query" not in repr(line) for line in delivery.logs)
    assert delivery.events("callback_delivered")[0]["callback_host"] == "127.0.0.1"


@pytest.mark.parametrize(
    "url", ["http://0177.0.0.1/hook", "http://[::127.0.0.1]/", "http://x:y/", "nope"]
)
async def test_a_url_refused_at_delivery_fails_once_without_a_stray_exception(
    url: str,
) -> None:
    """A record written before the egress rules tightened (or by an older replica) must
    not become "Task exception was never retrieved"."""
    loop = asyncio.get_running_loop()
    stray: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: stray.append(context))
    try:
        delivery = await deliver(url)
        gc.collect()  # a task that ended with an exception reports it when collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert stray == []
    assert (delivery.count("delivered"), delivery.count("failed")) == (0, 1)
    assert len(delivery.events("callback_failed")) == 1


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("0", 0.0),
        ("1", 1.0),
        (" 120 ", 120.0),
        ("Wed, 21 Oct 2015 07:29:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:29:00 -0000", 60.0),  # RFC 850's "no zone": still GMT
        ("Wednesday, 21-Oct-15 07:29:00 GMT", 60.0),  # an obsolete form HTTP still allows
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: no wait
        ("1.5", None),
        ("-5", None),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after_seconds(value, now=now) == seconds
