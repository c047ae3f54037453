"""GET /v1/tasks and the /admin routes (CONTRACT §1)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.integration.api_support import (
    create,
)
from tests.integration.support import (
    Client,
    sleep_body,
    wait_for_run,
)


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        resolved: dict[str, Any] = schema["$defs"][name]
        return resolved
    return schema


async def test_tasks_lists_sleep_and_http_with_their_input_schemas(memory_client: Client) -> None:
    response = await memory_client.get("/v1/tasks")
    assert response.status_code == 200
    tasks = {t["name"]: t for t in response.json()["tasks"]}
    assert {"sleep", "http"} <= set(tasks)
    sleep = _resolve(tasks["sleep"]["input_schema"])
    assert sleep["type"] == "object"
    assert sleep["required"] == ["seconds"]
    assert sleep["properties"]["seconds"]["minimum"] == 0
    assert sleep["properties"]["seconds"]["maximum"] == 86400
    assert sleep["properties"]["steps"]["minimum"] == 1
    http = _resolve(tasks["http"]["input_schema"])
    assert "url" in http["required"]
    assert "method" in http["properties"]
    assert tasks["sleep"]["description"]


# --- /admin ----------------------------------------------------------------------------


async def test_admin_state_shows_the_replica_and_its_active_runs(memory_client: Client) -> None:
    idle = (await memory_client.get("/admin/state")).json()
    assert idle == {
        "state": "ready",
        "worker_id": "worker-a",
        "active_runs": [],
        "active_count": 0,
        "max_active_runs": 100,
        "drain": None,
    }
    record = await create(memory_client, sleep_body(30))
    busy = (await memory_client.get("/admin/state")).json()
    assert busy["active_count"] == 1
    [active] = busy["active_runs"]
    assert active["run_id"] == record["run_id"]
    assert active["task"] == "sleep"
    assert active["age_seconds"] >= 0
    assert (await memory_client.post(f"/v1/runs/{record['run_id']}/cancel")).status_code == 202
    await wait_for_run(memory_client, record["run_id"], within=1)


async def test_a_second_drain_does_not_restart_the_first(memory_client: Client) -> None:
    first = await memory_client.post("/admin/drain")
    assert first.status_code == 202
    drain = first.json()["drain"]
    assert drain["trigger"] == "admin"
    assert drain["grace_seconds"] == 0.5
    assert drain["active_at_start"] == 0
    assert set(drain) == {
        "trigger", "started_at", "grace_seconds", "cancel_at", "active_at_start",
        "active_now", "cancelled", "finished", "left_running",
    }  # fmt: skip
    await asyncio.sleep(0.05)
    second = await memory_client.post("/admin/drain")
    assert second.status_code == 202
    assert second.json()["drain"]["started_at"] == drain["started_at"]
    assert second.json()["drain"]["trigger"] == "admin"
    assert second.json()["state"] in ("draining", "stopped")


async def test_admin_drain_with_wait_answers_once_the_drain_has_finished(client: Client) -> None:
    record = await create(client, sleep_body(30))
    response = await client.post("/admin/drain", params={"wait": 5})
    assert response.status_code == 202
    state = response.json()
    assert state["state"] == "stopped"
    assert state["drain"]["finished"] is True
    assert state["drain"]["cancelled"] == 1
    final = (await client.get(f"/v1/runs/{record['run_id']}")).json()
    assert final["status"] == "failed"
    assert final["error"]["reason"] == "shutdown"


# --- OpenAPI and metrics ----------------------------------------------------------------
