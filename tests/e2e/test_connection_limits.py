"""The real server keeps answering while clients hold requests open (small scale).

With ``QUIESCE_MAX_STREAMS=20`` ``quiesce serve`` gives Granian a backpressure of
2 x 20 + 64 = 104 concurrent requests. The test holds every stream the budget
allows plus slow bodies, and checks that the probes, ``/metrics`` and a create are
still answered, that one stream more is refused with 503 + ``Retry-After``, and
that a body sent too slowly gets a clean 408 (a response, then the connection
closed) — which frees its slot. ``bench/connection_flood.py`` does the same at
2,000 connections.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from service.cli import granian_backpressure
from service.config import Settings
from tests.conftest import RedisServer
from tests.e2e.conftest import Server, start_server, stop
from tests.integration.support import metric

MAX_STREAMS = 20
SLOW_BODIES = 40
BODY_TIMEOUT_SECONDS = 2
#: Failure conditions only: nothing here is timed.
GENEROUS_SECONDS = 20.0

pytestmark = pytest.mark.slow


@pytest.fixture
def limited(tmp_path: Path, redis_server: RedisServer) -> Iterator[Server]:
    instance = start_server(
        tmp_path,
        redis_server.url,
        QUIESCE_MAX_STREAMS=str(MAX_STREAMS),
        QUIESCE_REQUEST_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT_SECONDS),
    )
    yield instance
    stop(instance)


class Connection:
    """One raw HTTP/1.1 connection, so a test can hold it open or send a body slowly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, head: str, body: bytes = b"") -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode() + body)
        await writer.drain()
        return cls(reader, writer)

    async def response_head(self) -> tuple[int, dict[str, str]]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), GENEROUS_SECONDS)
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers

    async def json_body(self, headers: dict[str, str]) -> dict[str, object]:
        length = int(headers["content-length"])
        body = await asyncio.wait_for(self.reader.readexactly(length), GENEROUS_SECONDS)
        decoded: dict[str, object] = json.loads(body)
        return decoded

    async def read_until(self, marker: bytes) -> None:
        await asyncio.wait_for(self.reader.readuntil(marker), GENEROUS_SECONDS)

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), GENEROUS_SECONDS) == b""

    def close(self) -> None:
        self.writer.close()


def stream_request(run_id: str) -> str:
    return (
        f"GET /v1/runs/{run_id}/events/stream HTTP/1.1\r\nHost: test\r\n"
        "Accept: text/event-stream\r\n\r\n"
    )


SLOW_CREATE = (
    "POST /v1/runs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    "Content-Length: 1000\r\n\r\n"
)


@pytest.fixture
async def connections() -> AsyncIterator[list[Connection]]:
    opened: list[Connection] = []
    yield opened
    for connection in opened:
        connection.close()


def test_the_backpressure_leaves_room_beside_every_stream() -> None:
    settings = Settings(max_streams=MAX_STREAMS)
    assert granian_backpressure(settings) > 2 * MAX_STREAMS
    assert granian_backpressure(Settings()) > 1500 + 500 + 1000


async def test_probes_and_creates_answer_with_every_stream_and_slow_bodies_open(
    limited: Server, connections: list[Connection]
) -> None:
    async with httpx.AsyncClient(base_url=limited.url, timeout=GENEROUS_SECONDS) as client:
        created = await client.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 120}})
        assert created.status_code == 202, created.text
        run_id = created.json()["run_id"]

        for _ in range(MAX_STREAMS):
            stream = await Connection.open(limited.port, stream_request(run_id))
            connections.append(stream)
            status, _ = await stream.response_head()
            assert status == 200
            await stream.read_until(b"event: run_started")

        # One stream more than the budget: refused at once, in the usual error shape.
        extra = await Connection.open(limited.port, stream_request(run_id))
        connections.append(extra)
        status, headers = await extra.response_head()
        assert status == 503
        assert int(headers["retry-after"]) >= 1
        body = await extra.json_body(headers)
        assert body["status_code"] == 503
        assert "event streams" in str(body["detail"])

        slow = []
        for _ in range(SLOW_BODIES):
            connection = await Connection.open(limited.port, SLOW_CREATE, b'{"task": "sl')
            connections.append(connection)
            slow.append(connection)

        # Every stream and every slow body is held open; the pod still answers.
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        another = await client.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 0}})
        assert another.status_code == 202, another.text
        text = (await client.get("/metrics")).text
        assert metric(text, "quiesce_streams_active") == MAX_STREAMS
        assert metric(text, "quiesce_max_streams") == MAX_STREAMS
        assert metric(text, "quiesce_streams_rejected_total") == 1

        # The slow bodies run out of time: a clean 408 each, then the connection closes.
        for connection in slow:
            status, headers = await connection.response_head()
            assert status == 408
            body = await connection.json_body(headers)
            assert body["status_code"] == 408
            assert "did not arrive within 2s" in str(body["detail"])
            assert await connection.closed_by_server()

        text = (await client.get("/metrics")).text
        assert metric(text, "quiesce_request_body_timeouts_total") == SLOW_BODIES
        assert (
            metric(
                text, "quiesce_http_requests_total", method="POST", route="/v1/runs", status="408"
            )
            == SLOW_BODIES
        )
        # The streams are still open and live: the run's cancel reaches every one.
        cancelled = await client.post(f"/v1/runs/{run_id}/cancel")
        assert cancelled.status_code == 202
        for stream in connections[:MAX_STREAMS]:
            await stream.read_until(b"event: run_cancelled")
        # Each stream gives its slot back once it has ended.
        deadline = asyncio.get_running_loop().time() + GENEROUS_SECONDS
        while metric((await client.get("/metrics")).text, "quiesce_streams_active") != 0:
            assert asyncio.get_running_loop().time() < deadline, "streams still counted open"
            await asyncio.sleep(0.05)
