"""A client's ``Idempotency-Key`` and a signed webhook's ``webhook-id`` are separate key
spaces: no header text a client can send names the run of a webhook message."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.scheduler import run_id_for_key
from service.web.app import create_app
from service.webhooks import WebhookKey
from tests.conftest import AUTH

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY = b'{"task": "sleep", "input": {"seconds": 0}}'


@pytest.fixture
async def signed_client(any_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(create_app(replace(any_settings, webhook_secret=SECRET))) as c:
        c.headers.update(AUTH)
        yield c


def signed(message_id: str, **extra: str) -> dict[str, str]:
    headers = WebhookKey(SECRET).headers(message_id, int(time.time()), BODY)
    return {**headers, "content-type": "application/json", **extra}


@pytest.mark.parametrize("client_key", ["webhook:msg_1", "msg_1"])
async def test_a_client_key_never_replays_a_webhook_message(
    signed_client: AsyncTestClient[Any], client_key: str
) -> None:
    webhook = await signed_client.post("/v1/runs", content=BODY, headers=signed("msg_1"))
    assert webhook.status_code == 202, webhook.text
    client = await signed_client.post(
        "/v1/runs", content=BODY, headers=signed("msg_2", **{"Idempotency-Key": client_key})
    )
    assert client.status_code == 202, client.text
    assert "idempotent-replayed" not in client.headers
    assert client.json()["run_id"] != webhook.json()["run_id"]
    # Each still replays within its own space.
    again = await signed_client.post("/v1/runs", content=BODY, headers=signed("msg_1"))
    assert again.json()["run_id"] == webhook.json()["run_id"]
    assert again.headers["idempotent-replayed"] == "true"


async def test_a_webhook_message_never_replays_a_client_key(
    signed_client: AsyncTestClient[Any],
) -> None:
    client = await signed_client.post(
        "/v1/runs", content=BODY, headers=signed("msg_a", **{"Idempotency-Key": "webhook:msg_b"})
    )
    assert client.status_code == 202, client.text
    webhook = await signed_client.post("/v1/runs", content=BODY, headers=signed("msg_b"))
    assert webhook.status_code == 202, webhook.text
    assert "idempotent-replayed" not in webhook.headers
    assert webhook.json()["run_id"] != client.json()["run_id"]
    assert client.json()["run_id"] == run_id_for_key("webhook:msg_b")
    assert webhook.json()["run_id"] == run_id_for_key("msg_b", "webhook")


def test_the_two_spaces_hash_differently() -> None:
    assert run_id_for_key("k") == run_id_for_key("k", "client")
    assert run_id_for_key("k", "webhook") != run_id_for_key("k", "client")
    assert run_id_for_key("webhook:k") != run_id_for_key("k", "webhook")
