"""``retry`` on create (CONTRACT §1): the record's attempts, what is refused, and the
queue-length gauge that one replica exports."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from service.config import Settings
from tests.conftest import RedisServer
from tests.integration.api_support import app_client
from tests.integration.support import Client, metric, metrics_text, sleep_body


async def test_a_create_with_retry_answers_with_its_attempts(memory_client: Client) -> None:
    body = sleep_body(0, retry={"max_attempts": 3})
    response = await memory_client.post("/v1/runs", json=body)
    assert response.status_code == 202, response.text
    record = response.json()
    assert record["attempt"] == 1
    assert record["max_attempts"] == 3
    assert record["retry"] == {"max_attempts": 3, "on": ["shutdown", "worker_lost"]}


async def test_a_create_without_retry_has_one_attempt(memory_client: Client) -> None:
    response = await memory_client.post("/v1/runs", json=sleep_body(0))
    assert response.status_code == 202, response.text
    record = response.json()
    assert (record["attempt"], record["max_attempts"], record["retry"]) == (1, 1, None)


@pytest.mark.parametrize(
    ("retry", "key"),
    [
        ({"max_attempts": 0}, "retry.max_attempts"),
        ({"max_attempts": 11}, "retry.max_attempts"),
        ({}, "retry.max_attempts"),
        ({"max_attempts": 2, "on": []}, "retry.on"),
        ({"max_attempts": 2, "on": ["cancelled"]}, "retry.on[0]"),
        ({"max_attempts": 2, "when": ["error"]}, "retry.when"),
    ],
)
async def test_an_invalid_retry_is_400_naming_the_field(
    memory_client: Client, retry: dict[str, Any], key: str
) -> None:
    response = await memory_client.post("/v1/runs", json=sleep_body(0, retry=retry))
    assert response.status_code == 400, response.text
    assert response.json()["extra"][0]["key"] == key


async def test_the_queue_length_is_exported_by_exactly_one_replica(
    settings: Settings, redis_server: RedisServer
) -> None:
    shared = replace(settings, redis_url=redis_server.url)
    async with (
        app_client(shared, worker_id="replica-a") as a,
        app_client(shared, worker_id="replica-b") as b,
    ):
        # Bounded only so that an adopter that never reports fails the test.
        deadline = time.monotonic() + 10
        while True:
            texts = [await metrics_text(client) for client in (a, b)]
            values = [metric(text, "quiesce_queued_runs") for text in texts]
            if any(value is not None for value in values):
                break
            assert time.monotonic() < deadline, "no replica exports quiesce_queued_runs"
            await asyncio.sleep(0.05)
        assert sorted(value is None for value in values) == [False, True], values
        assert [v for v in values if v is not None] == [0]
        for text in texts:
            assert metric(text, "quiesce_runs_adopted_total", task="sleep") == 0
            assert metric(text, "quiesce_runs_requeued_total", task="sleep", reason="shutdown") == 0
