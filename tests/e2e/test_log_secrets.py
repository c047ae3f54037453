"""No header, body or token in the pod's log, end to end: the real server process runs
an ``http`` task that fails while holding an ``Authorization`` header and a body, and
its whole captured output is searched for them."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.store.redis import RedisRunStore
from tests.conftest import AUTH, TOKEN, RedisServer, free_port
from tests.e2e.conftest import start_server, stop

pytestmark = pytest.mark.e2e

HEADER_VALUE = "Bearer hdr-5e1f0c-do-not-log"
BODY_TEXT = "body-a93d27-do-not-log"
QUERY_VALUE = "query-77b0e4-do-not-log"


class DroppingServer:
    """Accepts a connection, reads the request, and closes without answering."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.received = bytearray()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(2.0)
                try:
                    while BODY_TEXT.encode() not in self.received:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        self.received += chunk
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def dropping_server() -> Iterator[DroppingServer]:
    server = DroppingServer()
    yield server
    server.close()


async def wait_failed(http: httpx.AsyncClient, run_id: str) -> dict[str, object]:
    for _ in range(200):
        record: dict[str, object] = (await http.get(f"/v1/runs/{run_id}")).json()
        if record["status"] != "running" and record["status"] != "queued":
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish")


async def test_a_failing_http_task_leaves_no_header_body_or_token_in_the_log(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_store: RedisRunStore,
    dropping_server: DroppingServer,
) -> None:
    server = start_server(
        tmp_path,
        redis_server.url,
        QUIESCE_API_TOKEN=TOKEN,
        QUIESCE_HTTP_ALLOWED_HOSTS="127.0.0.1",
    )
    try:
        targets = {
            # The connection is dropped after the request was sent.
            "dropped": f"http://127.0.0.1:{dropping_server.port}/hook?k={QUERY_VALUE}",
            # Nothing listens there: the connection is refused.
            "refused": f"http://127.0.0.1:{free_port()}/hook?k={QUERY_VALUE}",
        }
        async with httpx.AsyncClient(base_url=server.url, timeout=5, headers=AUTH) as http:
            run_ids = []
            for url in targets.values():
                created = await http.post(
                    "/v1/runs",
                    json={
                        "task": "http",
                        "input": {
                            "url": url,
                            "method": "POST",
                            "headers": {"Authorization": HEADER_VALUE},
                            "text": BODY_TEXT,
                            "timeout_seconds": 5,
                        },
                    },
                )
                assert created.status_code == 202, created.text
                run_ids.append(created.json()["run_id"])
            for run_id in run_ids:
                record = await wait_failed(http, run_id)
                assert record["status"] == "failed", record
        # The request really carried them: their absence from the log means something.
        assert HEADER_VALUE.encode() in dropping_server.received
        assert BODY_TEXT.encode() in dropping_server.received
    finally:
        stop(server)
    output = server.log()
    events = server.log_events()
    for run_id in run_ids:
        raised = [e for e in events if e.get("event") == "run_task_raised"]
        assert any(e.get("run_id") == run_id and e.get("exception") for e in raised), output
        assert any(
            e.get("event") == "run_finished" and e.get("run_id") == run_id for e in events
        ), output
    for secret in (HEADER_VALUE, "hdr-5e1f0c", BODY_TEXT, QUERY_VALUE, TOKEN):
        assert secret not in output, f"{secret!r} is in the server's output"
