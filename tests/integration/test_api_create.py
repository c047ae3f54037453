"""POST /v1/runs (CONTRACT §1): the record, validation, 401/413/415/422, capacity, draining."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from service.config import Settings
from tests.integration.api_support import (
    app_client,
    create,
    post_raw,
    rejected,
)
from tests.integration.support import (
    Client,
    metric,
    metrics_text,
    parse_sse,
    raw_get,
    sleep_body,
    wait_for_run,
)


async def test_create_answers_202_with_the_record_and_its_location(client: Client) -> None:
    body = sleep_body(0.05, 2, metadata={"team": "a"}, timeout_seconds=60)
    response = await client.post("/v1/runs", json=body)
    assert response.status_code == 202
    record = response.json()
    assert response.headers["location"] == f"/v1/runs/{record['run_id']}"
    assert "idempotent-replayed" not in response.headers
    assert record["run_id"].startswith("run_")
    assert record["task"] == "sleep"
    assert record["status"] == "running"
    assert record["worker_id"] == "worker-a"
    assert record["metadata"] == {"team": "a"}
    assert record["timeout_seconds"] == 60
    assert record["created_at"].endswith("Z")
    assert record["finished_at"] is None
    assert record["output"] is None
    assert record["error"] is None

    read = await client.get(response.headers["location"])
    assert read.status_code == 200
    assert read.json()["run_id"] == record["run_id"]
    done = await wait_for_run(client, record["run_id"])
    assert done["status"] == "succeeded"
    assert done["output"] == {"slept": 0.05}
    assert done["finished_at"] is not None

    # Without timeout_seconds the run gets QUIESCE_RUN_TIMEOUT_SECONDS.
    default = await create(client, {"task": "sleep", "input": {"seconds": 0}})
    assert default["timeout_seconds"] == 3600


async def test_malformed_json_is_400(memory_client: Client) -> None:
    for content in (b'{"task": "sleep"', b"nope", b"", b"[1, 2]", b'"sleep"'):
        response = await post_raw(memory_client, content)
        assert response.status_code == 400, content
        error = response.json()
        assert error["status_code"] == 400
        assert error["detail"]
        assert error["extra"][0]["source"] == "body"


WRONG_TYPES: list[tuple[dict[str, Any], str]] = [
    ({"task": "sleep", "timeout_seconds": "600"}, "timeout_seconds"),
    ({"task": 5}, "task"),
    ({"task": "sleep", "input": "seconds=1"}, "input"),
    ({"task": "sleep", "metadata": {"k": 1}}, "metadata[...]"),
    ({"task": "sleep", "callback_url": 7}, "callback_url"),
    ({"task": "sleep", "timeout_seconds": 0}, "timeout_seconds"),
    ({"task": "sleep", "timeout_seconds": 8 * 24 * 3600}, "timeout_seconds"),
    ({"input": {}}, "task"),
]


async def test_wrong_types_are_400_never_coerced(memory_client: Client) -> None:
    for body, key in WRONG_TYPES:
        response = await memory_client.post("/v1/runs", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()
        assert error["extra"][0]["key"] == key, body
        assert error["extra"][0]["source"] == "body"
        assert "- at `$" in error["detail"], body
    assert await rejected(memory_client, "invalid") == len(WRONG_TYPES)


async def test_unknown_top_level_field_is_400_naming_it(memory_client: Client) -> None:
    response = await memory_client.post("/v1/runs", json={"task": "sleep", "priority": 1})
    assert response.status_code == 400
    assert "unknown field `priority`" in response.json()["detail"]
    assert response.json()["extra"][0]["key"] == "priority"


#: (input, JSON path in the message, the offending field): a missing or unknown field
#: is reported at its parent object, and named as the field itself.
BAD_SLEEP_INPUTS: list[tuple[dict[str, Any], str, str]] = [
    ({"seconds": "1"}, "input.seconds", "input.seconds"),
    ({"seconds": -1}, "input.seconds", "input.seconds"),
    ({"seconds": 86401}, "input.seconds", "input.seconds"),
    ({"seconds": 1, "steps": 0}, "input.steps", "input.steps"),
    ({"seconds": 1, "steps": 1.5}, "input.steps", "input.steps"),
    ({}, "input", "input.seconds"),
    ({"seconds": 1, "extra": 1}, "input", "input.extra"),
]


async def test_bad_task_input_is_400_with_the_field_path_and_no_run(
    memory_client: Client,
) -> None:
    client = memory_client
    for task_input, path, field in BAD_SLEEP_INPUTS:
        response = await client.post("/v1/runs", json={"task": "sleep", "input": task_input})
        assert response.status_code == 400, (task_input, response.text)
        error = response.json()
        assert f"`$.{path}`" in error["detail"], task_input
        assert error["extra"][0]["key"] == field, task_input
    text = await metrics_text(client)
    assert metric(text, "quiesce_runs_started_total", task="sleep") == 0
    assert metric(text, "quiesce_active_runs") == 0
    assert metric(text, "quiesce_runs_rejected_total", reason="invalid") == len(BAD_SLEEP_INPUTS)


async def test_http_task_to_a_private_address_is_refused_at_admission(
    memory_client: Client,
) -> None:
    body = {"task": "http", "input": {"url": "http://127.0.0.1:9/"}}
    response = await memory_client.post("/v1/runs", json=body)
    assert response.status_code == 400
    assert response.json()["extra"][0]["key"] == "input.url"
    assert "$.input.url" in response.json()["detail"]


async def test_too_many_metadata_keys_is_400(memory_client: Client) -> None:
    body = {"task": "sleep", "metadata": {f"k{i}": "v" for i in range(65)}}
    response = await memory_client.post("/v1/runs", json=body)
    assert response.status_code == 400
    assert response.json()["extra"][0]["key"] == "metadata"
    ok = {"task": "sleep", "input": {"seconds": 0}, "metadata": {f"k{i}": "v" for i in range(64)}}
    assert (await memory_client.post("/v1/runs", json=ok)).status_code == 202


async def test_a_body_over_one_mib_is_413(memory_client: Client) -> None:
    padding = "x" * (1024 * 1024)
    body = json.dumps({"task": "sleep", "metadata": {"k": padding}})
    response = await post_raw(memory_client, body)
    assert response.status_code == 413
    assert response.json()["status_code"] == 413


async def test_a_body_that_is_not_json_is_415(memory_client: Client) -> None:
    body = json.dumps(sleep_body(0))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "", "json"):
        response = await post_raw(memory_client, body, content_type)
        assert response.status_code == 415, content_type
        assert response.json()["status_code"] == 415


async def test_json_with_a_charset_or_a_json_suffix_is_accepted(memory_client: Client) -> None:
    body = json.dumps(sleep_body(0))
    assert (
        await post_raw(memory_client, body, "application/json; charset=utf-8")
    ).status_code == 202
    assert (await post_raw(memory_client, body, "application/vnd.quiesce+json")).status_code == 202


async def test_an_unknown_task_is_422(memory_client: Client) -> None:
    response = await memory_client.post("/v1/runs", json={"task": "resize"})
    assert response.status_code == 422
    assert "resize" in response.json()["detail"]


async def test_invalid_creates_count_as_rejected_invalid(memory_client: Client) -> None:
    await post_raw(memory_client, b"{")  # 400
    await post_raw(memory_client, b"x" * (1024 * 1024 + 1))  # 413
    await post_raw(memory_client, b"{}", "text/plain")  # 415
    await memory_client.post("/v1/runs", json={"task": "resize"})  # 422
    assert await rejected(memory_client, "invalid") == 4
    assert await rejected(memory_client, "unauthorized") == 0


async def test_create_without_or_with_a_wrong_token_is_401(memory_client: Client) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-token-0123456789"}):
        response = await memory_client.post("/v1/runs", json=sleep_body(0), headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["status_code"] == 401
    assert await rejected(memory_client, "unauthorized") == 2
    # Reads refused for the same reason are not rejected creates.
    assert (await memory_client.get("/v1/tasks", headers={"Authorization": ""})).status_code == 401
    assert await rejected(memory_client, "unauthorized") == 2
    assert (
        metric(await metrics_text(memory_client), "quiesce_runs_started_total", task="sleep") == 0
    )


async def test_at_capacity_a_create_is_429_with_retry_after(any_settings: Settings) -> None:
    async with app_client(any_settings, max_active_runs=1) as client:
        long_run = await create(client, sleep_body(30))
        response = await client.post("/v1/runs", json=sleep_body(0))
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert await rejected(client, "capacity") == 1
        text = await metrics_text(client)
        assert metric(text, "quiesce_active_runs") == 1
        assert metric(text, "quiesce_max_active_runs") == 1
        # Capacity frees up when the run ends.
        cancel = await client.post(f"/v1/runs/{long_run['run_id']}/cancel")
        assert cancel.status_code == 202
        await wait_for_run(client, long_run["run_id"], within=2)
        for _ in range(50):
            response = await client.post("/v1/runs", json=sleep_body(0))
            if response.status_code == 202:
                break
            await asyncio.sleep(0.02)
        assert response.status_code == 202


async def test_while_draining_creates_are_503_and_reads_are_served(
    any_settings: Settings,
) -> None:
    async with app_client(any_settings, shutdown_grace_seconds=10) as client:
        run = await create(client, sleep_body(30))
        keyed = await create(client, sleep_body(0), **{"Idempotency-Key": "drain-key"})
        await wait_for_run(client, keyed["run_id"])
        stream = asyncio.create_task(
            raw_get(client, f"/v1/runs/{run['run_id']}/events/stream", max_seconds=5)
        )
        await asyncio.sleep(0.3)

        drain = await client.post("/admin/drain")
        assert drain.status_code == 202
        state = drain.json()
        assert state["state"] == "draining"
        assert state["drain"]["trigger"] == "admin"
        assert state["drain"]["active_at_start"] == 1
        assert state["drain"]["grace_seconds"] == 10
        assert state["drain"]["finished"] is False

        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "draining"}
        health = await client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["state"] == "draining"

        refused = await client.post("/v1/runs", json=sleep_body(0))
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        # A repeated create is refused like any other, so the retry lands elsewhere.
        replay = await client.post(
            "/v1/runs", json=sleep_body(0), headers={"Idempotency-Key": "drain-key"}
        )
        assert replay.status_code == 503
        text = await metrics_text(client)
        assert metric(text, "quiesce_runs_rejected_total", reason="draining") == 2
        assert metric(text, "quiesce_draining") == 1

        # Open streams end with a reconnect hint.
        streamed = await stream
        assert streamed.ended
        assert parse_sse(streamed.text)[-1].get("retry") == "1000"

        # Reads and cancels are still served.
        assert (await client.get(f"/v1/runs/{run['run_id']}")).status_code == 200
        assert (await client.get(f"/v1/runs/{run['run_id']}/events")).status_code == 200
        cancel = await client.post(f"/v1/runs/{run['run_id']}/cancel")
        assert cancel.status_code == 202
        record = await wait_for_run(client, run["run_id"], within=1.0)
        assert record["status"] == "cancelled"

        # With no run left the drain finishes long before its grace.
        for _ in range(100):
            final = (await client.get("/admin/state")).json()
            if final["state"] == "stopped":
                break
            await asyncio.sleep(0.02)
        assert final["state"] == "stopped"
        assert final["drain"]["finished"] is True
        assert final["drain"]["cancelled"] == 0
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.post("/v1/runs", json=sleep_body(0))).status_code == 503
