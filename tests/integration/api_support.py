"""Helpers of the HTTP API tests (``test_api_*.py``): app clients, creates, counters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from litestar.testing import AsyncTestClient

from service.config import Settings
from service.web.app import create_app
from tests.conftest import AUTH
from tests.integration.support import Client, metric, metrics_text, sleep_body, wait_for_run

UNKNOWN_RUN = "run_" + "a" * 26


@asynccontextmanager
async def app_client(settings: Settings, **changes: Any) -> AsyncIterator[Client]:
    async with AsyncTestClient(create_app(replace(settings, **changes))) as client:
        client.headers.update(AUTH)
        yield client


async def create(client: Client, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = await client.post("/v1/runs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    record: dict[str, Any] = response.json()
    return record


async def post_raw(
    client: Client, content: bytes | str, content_type: str = "application/json", **headers: str
) -> Any:
    return await client.post(
        "/v1/runs", content=content, headers={"content-type": content_type, **headers}
    )


async def rejected(client: Client, reason: str) -> float:
    value = metric(await metrics_text(client), "quiesce_runs_rejected_total", reason=reason)
    assert value is not None
    return value


async def finished_run(client: Client, steps: int = 3) -> tuple[dict[str, Any], list[str]]:
    """A succeeded sleep run with ``steps`` progress events; its record and event ids."""
    record = await create(client, sleep_body(0.03, steps))
    record = await wait_for_run(client, record["run_id"])
    assert record["status"] == "succeeded"
    page = (await client.get(f"/v1/runs/{record['run_id']}/events")).json()
    return record, [event["id"] for event in page["events"]]
