"""The HTTP API of CONTRACT §1, route by route and error by error, on both stores."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.scheduler import run_id_for_key
from service.schemas import request_decoder, request_fingerprint
from service.web.app import create_app
from tests.conftest import AUTH
from tests.integration.support import (
    Client,
    events_of,
    metric,
    metrics_text,
    parse_sse,
    raw_get,
    services,
    sleep_body,
    wait_for_run,
)

UNKNOWN_RUN = "run_" + "a" * 26


@pytest.fixture
async def memory_client(settings: Settings) -> AsyncIterator[Client]:
    """For what does not depend on the store (request validation, routing, auth)."""
    async with app_client(settings) as client:
        yield client


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


# --- POST /v1/runs ----------------------------------------------------------------------


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


# --- idempotency ------------------------------------------------------------------------


async def test_same_key_and_body_replays_the_original_without_a_second_run(
    client: Client,
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post("/v1/runs", json=sleep_body(0.02), headers=headers)
    assert first.status_code == 202
    assert "idempotent-replayed" not in first.headers
    await wait_for_run(client, first.json()["run_id"])

    again = await client.post("/v1/runs", json=sleep_body(0.02), headers=headers)
    assert again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert again.json() == first.json()  # the record as created

    # The same content serialized differently is the same request.
    reordered = '{ "input" : {"steps": 1, "seconds": 0.02},\n  "task": "sleep" }'
    third = await post_raw(client, reordered, **headers)
    assert third.status_code == 202
    assert third.headers["idempotent-replayed"] == "true"
    assert third.json()["run_id"] == first.json()["run_id"]

    text = await metrics_text(client)
    assert metric(text, "quiesce_runs_started_total", task="sleep") == 1


async def test_same_key_with_a_different_body_is_422(client: Client) -> None:
    headers = {"Idempotency-Key": "order-43"}
    assert (await client.post("/v1/runs", json=sleep_body(0), headers=headers)).status_code == 202
    response = await client.post("/v1/runs", json=sleep_body(1), headers=headers)
    assert response.status_code == 422
    assert "idempotency" in response.json()["detail"].lower()
    assert await rejected(client, "invalid") == 1


async def test_an_idempotency_key_must_have_1_to_255_characters(client: Client) -> None:
    for length in (0, 256, 1000):
        headers = {"Idempotency-Key": "k" * length}
        response = await client.post("/v1/runs", json=sleep_body(0), headers=headers)
        assert response.status_code == 400, length
        assert response.json()["extra"][0]["key"] == "Idempotency-Key"
    headers = {"Idempotency-Key": "k" * 255}
    response = await client.post("/v1/runs", json=sleep_body(0), headers=headers)
    assert response.status_code == 202
    assert response.json()["run_id"] == run_id_for_key("k" * 255)


async def test_a_key_still_being_admitted_is_409(client: Client) -> None:
    body = sleep_body(0)
    key = "order-44"
    run_id = run_id_for_key(key)
    fingerprint = request_fingerprint(request_decoder.decode(json.dumps(body)))
    store = services(client).store
    # Another request holds the claim: it is between claim and create.
    claimed = client.blocking_portal.call(
        store.claim_idempotency, run_id, fingerprint, "another-request"
    )
    assert claimed is None

    response = await client.post("/v1/runs", json=body, headers={"Idempotency-Key": key})
    assert response.status_code == 409
    assert "admitted" in response.json()["detail"]
    assert (await client.get(f"/v1/runs/{run_id}")).status_code == 404


# --- GET /v1/runs/{run_id} --------------------------------------------------------------


async def test_every_run_route_is_404_for_an_unknown_or_malformed_run(client: Client) -> None:
    for run_id in (UNKNOWN_RUN, "run_bad", "RUN_" + "A" * 26, "x" * 300, UNKNOWN_RUN + "a"):
        for method, path in (
            ("GET", f"/v1/runs/{run_id}"),
            ("GET", f"/v1/runs/{run_id}/events"),
            ("GET", f"/v1/runs/{run_id}/events?after=1-0"),
            ("GET", f"/v1/runs/{run_id}/events/stream"),
            ("GET", f"/v1/runs/{run_id}/events/stream?after=1-0"),
            ("POST", f"/v1/runs/{run_id}/cancel"),
        ):
            response = await client.request(method, path)
            assert response.status_code == 404, (method, path)
            assert response.json()["status_code"] == 404


# --- GET /v1/runs/{run_id}/events -------------------------------------------------------


async def test_events_page_oldest_first_with_exclusive_cursor_and_limit(client: Client) -> None:
    record, ids = await finished_run(client, steps=3)
    run_id = record["run_id"]
    page = (await client.get(f"/v1/runs/{run_id}/events")).json()
    types = [event["type"] for event in page["events"]]
    assert types == ["run_started", "run_progress", "run_progress", "run_progress", "run_succeeded"]
    assert [e["data"] for e in page["events"][1:4]] == [
        {"step": 1, "of": 3}, {"step": 2, "of": 3}, {"step": 3, "of": 3},
    ]  # fmt: skip
    assert page["events"][-1]["data"] == {"output": {"slept": 0.03}}
    assert page["events"][0]["data"] == {"worker_id": "worker-a"}
    assert page["next_cursor"] == ids[-1]
    assert all(event["created_at"].endswith("Z") for event in page["events"])

    first = (await client.get(f"/v1/runs/{run_id}/events", params={"limit": 2})).json()
    assert [e["id"] for e in first["events"]] == ids[:2]
    assert first["next_cursor"] == ids[1]
    second = (
        await client.get(
            f"/v1/runs/{run_id}/events", params={"limit": 2, "after": first["next_cursor"]}
        )
    ).json()
    assert [e["id"] for e in second["events"]] == ids[2:4]
    last = (await client.get(f"/v1/runs/{run_id}/events", params={"after": ids[-1]})).json()
    assert last == {"events": [], "next_cursor": ids[-1]}
    limit_max = await client.get(f"/v1/runs/{run_id}/events", params={"limit": 1000})
    assert limit_max.status_code == 200


async def test_events_page_bad_parameters_are_400(memory_client: Client) -> None:
    record, _ = await finished_run(memory_client, steps=1)
    path = f"/v1/runs/{record['run_id']}/events"
    bad: list[dict[str, Any]] = [
        {"after": "not-a-cursor"}, {"after": "12"}, {"after": "1-2-3"},
        {"limit": 0}, {"limit": 1001}, {"limit": "x"},
    ]  # fmt: skip
    for params in bad:
        response = await memory_client.get(path, params=params)
        assert response.status_code == 400, params
        assert response.json()["extra"][0]["key"] == next(iter(params))


# --- GET /v1/runs/{run_id}/events/stream ------------------------------------------------


async def test_stream_replays_then_tails_live_until_the_terminal_event(client: Client) -> None:
    record = await create(client, sleep_body(0.6, 3))
    run_id = record["run_id"]
    response = await raw_get(client, f"/v1/runs/{run_id}/events/stream", max_seconds=5)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.ended, "the stream must end after the terminal event"
    # The first chunk is the opening comment (the keep-alive format).
    assert response.chunks[0][1] == b": stream opened\n\n"

    messages = events_of(response.text)
    assert [m["event"] for m in messages] == [
        "run_started", "run_progress", "run_progress", "run_progress", "run_succeeded",
    ]  # fmt: skip
    for message in messages:
        assert message["id"] == message["data"]["id"]
        assert message["event"] == message["data"]["type"]
    assert messages[-1]["data"]["data"] == {"output": {"slept": 0.6}}
    # Live: progress arrived spread over the run's duration, not in one burst at the end.
    times = [at for at, chunk in response.chunks if b"event: run_progress" in chunk]
    assert len(times) == 3
    assert times[-1] - times[0] >= 0.3
    page = (await client.get(f"/v1/runs/{run_id}/events")).json()
    assert [m["id"] for m in messages] == [e["id"] for e in page["events"]]


async def test_stream_resumes_after_last_event_id_or_after(client: Client) -> None:
    record, ids = await finished_run(client, steps=3)
    path = f"/v1/runs/{record['run_id']}/events/stream"

    resumed = await client.get(path, headers={"Last-Event-ID": ids[1]})
    assert resumed.status_code == 200
    assert [m["id"] for m in events_of(resumed.text)] == ids[2:]

    by_query = await client.get(path, params={"after": ids[2]})
    assert [m["id"] for m in events_of(by_query.text)] == ids[3:]

    # A reconnecting EventSource sends both: the header wins.
    both = await client.get(path, params={"after": ids[0]}, headers={"Last-Event-ID": ids[3]})
    assert [m["id"] for m in events_of(both.text)] == ids[4:]


async def test_stream_resumed_after_the_terminal_event_ends(client: Client) -> None:
    """An EventSource reconnects when a stream ends, sending the terminal event's id.

    The run is over and nothing will ever follow, so the stream must end at once
    rather than stay open with keep-alives forever.
    """
    record, ids = await finished_run(client, steps=1)
    response = await raw_get(
        client,
        f"/v1/runs/{record['run_id']}/events/stream",
        headers={"Last-Event-ID": ids[-1]},
        max_seconds=1,
    )
    assert response.status == 200
    assert response.ended, "the stream of a finished run stayed open after its terminal event"
    assert events_of(response.text) == []


async def test_stream_with_a_malformed_cursor_is_400(memory_client: Client) -> None:
    record, _ = await finished_run(memory_client, steps=1)
    path = f"/v1/runs/{record['run_id']}/events/stream"
    response = await memory_client.get(path, headers={"Last-Event-ID": "garbage"})
    assert response.status_code == 400
    assert response.json()["extra"][0]["key"] == "Last-Event-ID"
    response = await memory_client.get(path, params={"after": "garbage"})
    assert response.status_code == 400
    assert response.json()["extra"][0]["key"] == "after"


# --- POST /v1/runs/{run_id}/cancel ------------------------------------------------------


async def test_cancel_a_running_run(client: Client) -> None:
    record = await create(client, sleep_body(30, 3))
    run_id = record["run_id"]
    response = await client.post(f"/v1/runs/{run_id}/cancel")
    assert response.status_code == 202
    assert response.json()["run_id"] == run_id

    cancelled = await wait_for_run(client, run_id, within=1.0)
    assert cancelled["status"] == "cancelled"
    assert cancelled["error"]["reason"] == "cancelled"
    assert cancelled["finished_at"] is not None
    page = (await client.get(f"/v1/runs/{run_id}/events")).json()
    assert [e["type"] for e in page["events"]] == ["run_started", "run_cancelled"]
    assert page["events"][-1]["data"] == {"reason": "cancelled"}

    again = await client.post(f"/v1/runs/{run_id}/cancel")
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"

    text = await metrics_text(client)
    assert metric(text, "quiesce_run_cancellations_total", task="sleep", reason="user") == 1
    assert metric(text, "quiesce_runs_finished_total", task="sleep", status="cancelled") == 1
    assert metric(text, "quiesce_active_runs") == 0


async def test_cancel_a_finished_run_is_409(client: Client) -> None:
    record, _ = await finished_run(client, steps=1)
    response = await client.post(f"/v1/runs/{record['run_id']}/cancel")
    assert response.status_code == 409
    assert "succeeded" in response.json()["detail"]
    assert (await client.get(f"/v1/runs/{record['run_id']}")).json()["status"] == "succeeded"

    timed_out = await create(client, sleep_body(5, timeout_seconds=0.05))
    failed = await wait_for_run(client, timed_out["run_id"])
    assert failed["status"] == "failed"
    assert failed["error"]["reason"] == "timeout"
    assert (await client.post(f"/v1/runs/{timed_out['run_id']}/cancel")).status_code == 409


# --- GET /v1/tasks ----------------------------------------------------------------------


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


async def test_openapi_document_lists_the_run_routes(memory_client: Client) -> None:
    response = await memory_client.get("/schema/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in (
        "/v1/runs",
        "/v1/runs/{run_id}",
        "/v1/runs/{run_id}/events",
        "/v1/runs/{run_id}/events/stream",
        "/v1/runs/{run_id}/cancel",
        "/v1/tasks",
        "/admin/drain",
        "/admin/state",
    ):
        assert path in paths, path
    assert "post" in paths["/v1/runs"]


async def test_metrics_text_format_and_gauges(memory_client: Client) -> None:
    response = await memory_client.get("/metrics")
    assert response.status_code == 200
    media_type, *parameters = (p.strip() for p in response.headers["content-type"].split(";"))
    assert media_type == "text/plain"
    names = [parameter.partition("=")[0].lower() for parameter in parameters]
    # A parameter given twice is an invalid media type: Go's mime.ParseMediaType (and
    # so Prometheus 3, which fails such scrapes) refuses "charset=utf-8; charset=utf-8".
    assert sorted(names) == sorted(set(names)), response.headers["content-type"]
    assert {"version=0.0.4", "version=1.0.0"} & set(parameters)
    text = response.text
    assert "# TYPE quiesce_active_runs gauge" in text
    assert metric(text, "quiesce_active_runs") == 0
    assert metric(text, "quiesce_max_active_runs") == 100
    assert metric(text, "quiesce_draining") == 0
    for reason in ("draining", "capacity", "invalid", "unauthorized", "store_unavailable"):
        assert metric(text, "quiesce_runs_rejected_total", reason=reason) == 0

    record = await create(memory_client, sleep_body(30))
    assert metric(await metrics_text(memory_client), "quiesce_active_runs") == 1
    await memory_client.post(f"/v1/runs/{record['run_id']}/cancel")
    await wait_for_run(memory_client, record["run_id"], within=1)
    assert metric(await metrics_text(memory_client), "quiesce_active_runs") == 0


async def test_http_metrics_use_route_templates_never_raw_ids(memory_client: Client) -> None:
    record, _ = await finished_run(memory_client, steps=1)
    run_id = record["run_id"]
    name = "quiesce_http_requests_total"
    route = "/v1/runs/{run_id}"
    series = {
        "get_200": {"method": "GET", "route": route, "status": "200"},
        "get_404": {"method": "GET", "route": route, "status": "404"},
        "events_200": {"method": "GET", "route": route + "/events", "status": "200"},
        "cancel_409": {"method": "POST", "route": route + "/cancel", "status": "409"},
        "unmatched_404": {"method": "GET", "route": "unmatched", "status": "404"},
        "unmatched_405": {"method": "DELETE", "route": "unmatched", "status": "405"},
    }
    before_text = await metrics_text(memory_client)
    before = {key: metric(before_text, name, **labels) or 0 for key, labels in series.items()}

    await memory_client.get(f"/v1/runs/{run_id}")
    await memory_client.get(f"/v1/runs/{run_id}/events")
    await memory_client.post(f"/v1/runs/{run_id}/cancel")
    await memory_client.get(f"/v1/runs/{UNKNOWN_RUN}")
    await memory_client.get("/v1/runs/run_bad")
    await memory_client.delete(f"/v1/runs/{run_id}")  # 405
    await memory_client.get(f"/nowhere/{run_id}")  # 404, no route

    text = await metrics_text(memory_client)
    after = {key: metric(text, name, **labels) or 0 for key, labels in series.items()}
    assert {key: after[key] - before[key] for key in series} == {
        "get_200": 1,
        "get_404": 2,
        "events_200": 1,
        "cancel_409": 1,
        "unmatched_404": 1,
        "unmatched_405": 1,
    }
    for raw in (run_id, UNKNOWN_RUN, "run_bad", "/nowhere"):
        assert raw not in text
    assert metric(text, "quiesce_http_request_duration_seconds_count", method="GET", route=route)
