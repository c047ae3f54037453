"""Helpers shared by the HTTP-level tests: metrics, polling, SSE and client addresses.

``AsyncTestClient`` runs the app on its own event loop in a separate thread and
buffers every response until it is complete. Tests that need to see a stream's
chunks as they arrive (or to give up on a stream that does not end) use
:func:`raw_get`, which calls the ASGI app directly on the app's own loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from litestar.testing import AsyncTestClient
from litestar.types import ASGIApp, Receive, Scope, Send
from prometheus_client.parser import text_string_to_metric_families

from service.runs.drain import DrainProgress
from service.scheduler import Scheduler
from service.web.state import Services, services_of

Client = AsyncTestClient[Any]


def sleep_body(seconds: float, steps: int = 1, **fields: Any) -> dict[str, Any]:
    return {"task": "sleep", "input": {"seconds": seconds, "steps": steps}, **fields}


def services(client: Client) -> Services:
    app = client.app
    while not hasattr(app, "state"):  # a ClientAddress wrapper
        app = app.app
    return services_of(app)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text ``text`` (None if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def metrics_text(client: Client) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


async def wait_for_run(
    client: Client, run_id: str, *, status: str | None = None, within: float = 3.0
) -> dict[str, Any]:
    """Poll the run until it is terminal (or has ``status``); its record as JSON."""
    deadline = time.monotonic() + within
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await client.get(f"/v1/runs/{run_id}")
        assert response.status_code == 200, response.text
        record = response.json()
        ended = record["status"] not in ("running", "queued")
        if (status is None and ended) or record["status"] == status:
            return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} is {record.get('status')!r} after {within}s")


def parse_sse(text: str) -> list[dict[str, Any]]:
    """SSE messages as dicts: ``comment`` (list), ``id``, ``event``, ``data``, ``retry``."""
    messages = []
    for block in text.split("\n\n"):
        if not block:
            continue
        message: dict[str, Any] = {"comment": []}
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "":
                message["comment"].append(value)
            elif field == "data":
                message["data"] = json.loads(value)
            else:
                message[field] = value
        messages.append(message)
    return messages


def events_of(text: str) -> list[dict[str, Any]]:
    """Only the SSE messages that carry an event."""
    return [m for m in parse_sse(text) if "event" in m]


class ClientAddress:
    """An ASGI wrapper that makes every HTTP request come from ``host``."""

    def __init__(self, app: ASGIApp, host: str) -> None:
        self.app = app
        self.host = host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "client": (self.host, 1234)}  # type: ignore[assignment]
        await self.app(scope, receive, send)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    #: (seconds since the request started, body chunk)
    chunks: list[tuple[float, bytes]]
    #: False when the response was still open after ``max_seconds`` (then disconnected).
    ended: bool

    @property
    def text(self) -> str:
        return b"".join(chunk for _, chunk in self.chunks).decode()


async def raw_get(
    client: Client,
    path: str,
    *,
    query: str = "",
    headers: Mapping[str, str] | None = None,
    max_seconds: float = 5.0,
) -> RawResponse:
    """GET through the ASGI app on its own loop, recording when each chunk arrives."""
    all_headers = {**dict(client.headers), **(headers or {})}
    return await asyncio.to_thread(
        client.blocking_portal.call, _raw_get, client.app, path, query, all_headers, max_seconds
    )


async def _raw_get(
    app: ASGIApp, path: str, query: str, headers: dict[str, str], max_seconds: float
) -> RawResponse:
    loop = asyncio.get_running_loop()
    started = loop.time()
    scope: Any = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver.local")]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver.local", 80),
        "extensions": {},
    }
    disconnected = asyncio.Event()
    complete = asyncio.Event()
    request_sent = False
    response = RawResponse(status=0, headers={}, chunks=[], ended=False)

    async def receive() -> Any:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            if message.get("body"):
                response.chunks.append((loop.time() - started, message["body"]))
            if not message.get("more_body", False):
                complete.set()

    app_task = asyncio.create_task(app(scope, receive, send))
    try:
        await asyncio.wait_for(complete.wait(), max_seconds)
        response.ended = True
    except TimeoutError:
        response.ended = False
    disconnected.set()
    _, pending = await asyncio.wait([app_task], timeout=2.0)
    for task in pending:
        task.cancel()
    return response


async def drained(scheduler: Scheduler, grace: float, trigger: str = "test") -> DrainProgress:
    """Trigger the scheduler's drain with ``grace`` (or shorten it to that) and wait for it."""
    scheduler.drain.begin(trigger, grace_seconds=grace)
    progress = await scheduler.drain.wait()
    assert progress is not None
    return progress
