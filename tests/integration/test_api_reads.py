"""Reading runs (CONTRACT §1): the record, the events page, the event stream."""

from __future__ import annotations

from typing import Any

from tests.integration.api_support import (
    UNKNOWN_RUN,
    create,
    finished_run,
)
from tests.integration.support import (
    Client,
    events_of,
    raw_get,
    sleep_body,
)


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
    assert page["events"][0]["data"] == {"worker_id": "worker-a", "attempt": 1}
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
    assert response.json()["extra"][0]["source"] == "header"
    response = await memory_client.get(path, params={"after": "garbage"})
    assert response.status_code == 400
    assert response.json()["extra"][0]["key"] == "after"
    assert response.json()["extra"][0]["source"] == "query"


# --- POST /v1/runs/{run_id}/cancel ------------------------------------------------------
