"""Signed webhooks in, completion callbacks out, and the ``http`` task — against a real
HTTP receiver on loopback (allowed explicitly, as an operator would)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from service.callbacks import CallbackSender
from service.config import Settings
from service.egress import EgressPolicy
from service.metrics import Metrics
from service.schemas import RunError, RunRecord, utcnow
from service.web.app import create_app
from service.webhooks import InvalidSignature, WebhookKey
from tests.conftest import AUTH
from tests.integration.support import metric, metrics_text, wait_for_run

# The example of the Standard Webhooks specification, so any implementation agrees.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY = (
    "msg_p5jXN8AQM9LWM0D4loKWxJek",
    1614265330,
    b'{"test": 2432232314}',
)
CALLBACK_SECRET = "whsec_" + "c2VjcmV0LWZvci1jYWxsYmFja3MtMTIzNA=="


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real HTTP server in a thread; answers each request with the next status."""

    statuses: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def next_status(self) -> int:
        return self.statuses.pop(0) if self.statuses else 200


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            state.requests.append(Received(self.command, self.path, headers, body))
            payload = b"x" * 100 if self.path == "/big" else b'{"hello": "world"}'
            self.send_response(state.next_status())
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:  # keep the test output clean
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


async def wait_requests(receiver: Receiver, count: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while len(receiver.requests) < count:
        assert time.monotonic() < deadline, f"{len(receiver.requests)} of {count} requests"
        await asyncio.sleep(0.02)


# --- signatures ----------------------------------------------------------------------


def test_signatures_match_the_standard_webhooks_example() -> None:
    key = WebhookKey(SPEC_SECRET)
    assert key.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    headers = key.headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    assert key.verify(headers, SPEC_BODY, now=SPEC_TIMESTAMP + 10) == SPEC_ID


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"webhook-signature": None}, "missing"),
        ({"webhook-timestamp": "yesterday"}, "Unix time"),
        ({"webhook-timestamp": str(SPEC_TIMESTAMP - 301)}, "too far"),
        ({"webhook-signature": "v1,AAAA"}, "no signature matches"),
        ({"webhook-id": "msg_other"}, "no signature matches"),
    ],
)
def test_a_bad_signature_is_refused(change: dict[str, str | None], problem: str) -> None:
    key = WebhookKey(SPEC_SECRET)
    headers: dict[str, str] = key.headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    for name, value in change.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    with pytest.raises(InvalidSignature, match=problem):
        key.verify(headers, SPEC_BODY, now=SPEC_TIMESTAMP)


def test_any_of_several_signatures_may_match_during_a_key_rotation() -> None:
    key = WebhookKey(SPEC_SECRET)
    headers = key.headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    headers["webhook-signature"] = "v1,b2xkLWtleQ== " + headers["webhook-signature"]
    assert key.verify(headers, SPEC_BODY, now=SPEC_TIMESTAMP) == SPEC_ID


# --- signed webhooks on create -------------------------------------------------------


@pytest.fixture
async def signed_client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(replace(settings, webhook_secret=SPEC_SECRET))
    async with AsyncTestClient(app) as client:
        client.headers.update(AUTH)
        yield client


def signed(body: bytes, message_id: str = "msg_1") -> dict[str, str]:
    headers = WebhookKey(SPEC_SECRET).headers(message_id, int(time.time()), body)
    return {**headers, "content-type": "application/json"}


async def test_creates_must_be_signed_when_a_webhook_secret_is_set(
    signed_client: AsyncTestClient[Any],
) -> None:
    body = b'{"task": "sleep", "input": {"seconds": 0}}'
    unsigned = await signed_client.post(
        "/v1/runs", content=body, headers={"content-type": "application/json"}
    )
    assert unsigned.status_code == 401
    assert "webhook signature" in unsigned.json()["detail"]
    tampered = await signed_client.post(
        "/v1/runs", content=body.replace(b"0", b"9"), headers=signed(body)
    )
    assert tampered.status_code == 401
    accepted = await signed_client.post("/v1/runs", content=body, headers=signed(body))
    assert accepted.status_code == 202, accepted.text
    # The sender's retry of the same message is a replay, not a second run.
    again = await signed_client.post("/v1/runs", content=body, headers=signed(body))
    assert again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["run_id"] == accepted.json()["run_id"]
    text = await metrics_text(signed_client)
    assert metric(text, "quiesce_runs_rejected_total", reason="unauthorized") == 2
    assert metric(text, "quiesce_runs_started_total", task="sleep") == 1


# --- completion callbacks ------------------------------------------------------------


@pytest.fixture
async def callback_client(
    settings: Settings, receiver: Receiver
) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(
        replace(settings, callback_secret=CALLBACK_SECRET, http_allowed_hosts=("127.0.0.1",))
    )
    async with AsyncTestClient(app) as client:
        client.headers.update(AUTH)
        yield client


async def test_a_finished_run_is_posted_to_its_callback_url_signed(
    callback_client: AsyncTestClient[Any], receiver: Receiver
) -> None:
    created = await callback_client.post(
        "/v1/runs",
        json={
            "task": "sleep",
            "input": {"seconds": 0},
            "callback_url": f"{receiver.url}/done?token=1",
        },
    )
    assert created.status_code == 202, created.text
    run_id = created.json()["run_id"]
    await wait_requests(receiver, 1)
    request = receiver.requests[0]
    assert (request.method, request.path) == ("POST", "/done?token=1")
    assert request.headers["webhook-id"] == run_id
    timestamp = int(request.headers["webhook-timestamp"])
    assert WebhookKey(CALLBACK_SECRET).verify(request.headers, request.body, now=timestamp)
    payload = json.loads(request.body)
    assert payload["type"] == "run.succeeded"
    assert payload["data"]["run_id"] == run_id
    assert payload["data"]["output"] == {"slept": 0}
    await asyncio.sleep(0.05)
    text = await metrics_text(callback_client)
    assert metric(text, "quiesce_callbacks_total", outcome="delivered") == 1


@pytest.mark.parametrize(
    ("callback_url", "problem"),
    [
        ("http://10.1.2.3/hook", "not in QUIESCE_HTTP_ALLOWED_HOSTS"),
        ("ftp://example.com/hook", "http and https"),
        ("http://localhost:1/hook", "not in QUIESCE_HTTP_ALLOWED_HOSTS"),
    ],
)
async def test_a_callback_url_outside_the_egress_policy_is_refused_at_admission(
    callback_client: AsyncTestClient[Any], callback_url: str, problem: str
) -> None:
    response = await callback_client.post(
        "/v1/runs", json={"task": "sleep", "input": {"seconds": 0}, "callback_url": callback_url}
    )
    assert response.status_code == 400
    assert response.json()["extra"][0]["key"] == "callback_url"
    assert problem in response.json()["detail"]


def finished_record(url: str) -> RunRecord:
    now = utcnow()
    return RunRecord(
        run_id="run_" + "a" * 26,
        task="sleep",
        status="failed",
        created_at=now,
        updated_at=now,
        finished_at=now,
        worker_id="w",
        timeout_seconds=1,
        callback_url=url,
        error=RunError(reason="shutdown", message="stopped"),
    )


async def deliver(receiver: Receiver, statuses: list[int]) -> Metrics:
    receiver.statuses = statuses
    metrics = Metrics(max_active_runs=1)
    async with httpx.AsyncClient() as http:
        sender = CallbackSender(
            http=http,
            policy=EgressPolicy(["127.0.0.1"]),
            key=None,
            metrics=metrics,
            first_retry_seconds=0.01,
        )
        sender.send(finished_record(f"{receiver.url}/hook"))
        await sender.close(within=5)
    return metrics


async def test_a_failing_receiver_is_retried_until_it_answers(receiver: Receiver) -> None:
    metrics = await deliver(receiver, [500, 503, 429, 200])
    assert len(receiver.requests) == 4
    assert {r.headers["webhook-id"] for r in receiver.requests} == {"run_" + "a" * 26}
    assert "webhook-signature" not in receiver.requests[0].headers  # no secret, no signature
    assert msgspec.json.decode(receiver.requests[0].body)["type"] == "run.failed"
    assert metrics.callbacks.labels("delivered")._value.get() == 1
    assert metrics.callbacks.labels("failed")._value.get() == 0


async def test_a_refusing_receiver_is_not_retried(receiver: Receiver) -> None:
    metrics = await deliver(receiver, [400])
    assert len(receiver.requests) == 1
    assert metrics.callbacks.labels("failed")._value.get() == 1


async def test_retries_stop_after_the_last_attempt(receiver: Receiver) -> None:
    metrics = await deliver(receiver, [500] * 10)
    assert len(receiver.requests) == 5
    assert metrics.callbacks.labels("failed")._value.get() == 1


# --- the http task -------------------------------------------------------------------


async def test_the_http_task_calls_an_allowed_host_and_truncates_the_body(
    callback_client: AsyncTestClient[Any], receiver: Receiver
) -> None:
    created = await callback_client.post(
        "/v1/runs",
        json={
            "task": "http",
            "input": {
                "url": f"{receiver.url}/big",
                "method": "POST",
                "json": {"a": 1},
                "max_body_bytes": 10,
            },
        },
    )
    assert created.status_code == 202, created.text
    record = await wait_for_run(callback_client, created.json()["run_id"])
    assert record["status"] == "succeeded", record
    output = record["output"]
    assert output["status"] == 200
    assert output["body"] == "x" * 10
    assert output["truncated"] is True
    assert output["headers"]["content-type"] == "application/json"
    sent = receiver.requests[0]
    assert json.loads(sent.body) == {"a": 1}
    assert sent.headers["content-type"] == "application/json"
