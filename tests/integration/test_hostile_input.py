"""Inputs a hostile or careless client sends get a 400 that names what is wrong.

Each of these was a 500 (or a 200 and then a dropped stream) before: msgspec recurses
on nested JSON and raises UnicodeDecodeError on invalid UTF-8, and Redis refuses a
stream id past 64 bits. Every test runs once per store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.web.app import create_app
from tests.conftest import AUTH
from tests.integration.support import Client, sleep_body

JSON = {"Content-Type": "application/json"}
TOO_BIG = str(2**64)
LARGEST = str(2**64 - 1)


def refused(response: Any, key: str | None, source: str) -> str:
    """Assert a 400 in the shape of every 400, naming ``key`` in ``source``; its detail."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["status_code"] == 400
    assert body["extra"][0]["source"] == source
    assert body["extra"][0].get("key") == key
    detail: str = body["detail"]
    return detail


async def create(client: Client, **fields: Any) -> str:
    response = await client.post("/v1/runs", json=sleep_body(0.01, **fields))
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    return run_id


@pytest.fixture
async def shallow(any_settings: Settings) -> AsyncIterator[Client]:
    """A client of an app that allows JSON only 3 levels deep."""
    async with AsyncTestClient(create_app(replace(any_settings, max_json_depth=3))) as client:
        client.headers.update(AUTH)
        yield client


async def test_json_nested_1000_deep_is_a_400_naming_the_limit(client: Client) -> None:
    deep = b"[" * 1000 + b"]" * 1000
    body = b'{"task": "sleep", "input": {"seconds": 0, "x": ' + deep + b"}}"
    response = await client.post("/v1/runs", content=body, headers=JSON)
    assert "QUIESCE_MAX_JSON_DEPTH" in refused(response, None, "body")
    assert "64" in response.json()["detail"]


async def test_the_depth_limit_is_configurable(shallow: Client) -> None:
    within = {"task": "sleep", "input": {"seconds": 0.01}, "metadata": {"a": "[[[[{{{{"}}
    assert (await shallow.post("/v1/runs", json=within)).status_code == 202
    deeper = {"task": "sleep", "input": {"seconds": 0.01, "x": [[1]]}}
    response = await shallow.post("/v1/runs", json=deeper)
    assert "deeper than 3 levels" in refused(response, None, "body")


async def test_invalid_utf8_in_a_string_is_a_400(client: Client) -> None:
    body = b'{"task": "sleep", "input": {"seconds": 0}, "metadata": {"k": "\xff\xfe"}}'
    response = await client.post("/v1/runs", content=body, headers=JSON)
    assert "UTF-8" in refused(response, None, "body")


@pytest.mark.parametrize("cursor", [f"1-{TOO_BIG}", f"{TOO_BIG}-0", "1-99999999999999999999"])
async def test_a_cursor_past_64_bits_is_a_400(client: Client, cursor: str) -> None:
    run_id = await create(client)
    response = await client.get(f"/v1/runs/{run_id}/events", params={"after": cursor})
    assert "64 bits" in refused(response, "after", "query")


async def test_the_largest_cursor_is_a_400_not_a_store_error(client: Client) -> None:
    run_id = await create(client)
    response = await client.get(f"/v1/runs/{run_id}/events", params={"after": f"{LARGEST}-0"})
    assert response.status_code == 200, response.text
    assert response.json()["events"] == []
    largest = f"{LARGEST}-{LARGEST}"
    response = await client.get(f"/v1/runs/{run_id}/events", params={"after": largest})
    refused(response, "after", "query")


async def test_a_stream_refuses_a_cursor_past_64_bits_before_it_starts(client: Client) -> None:
    run_id = await create(client)
    response = await client.get(
        f"/v1/runs/{run_id}/events/stream", params={"after": f"1-{TOO_BIG}"}
    )
    refused(response, "after", "query")
    response = await client.get(
        f"/v1/runs/{run_id}/events/stream", headers={"Last-Event-ID": f"{TOO_BIG}-1"}
    )
    refused(response, "Last-Event-ID", "header")
    response = await client.get(
        f"/v1/runs/{run_id}/events/stream", headers={"Last-Event-ID": "not-a-cursor"}
    )
    refused(response, "Last-Event-ID", "header")


@pytest.mark.parametrize("limit", ["0", "1001", "99999999999999999999999", "-1", "1e4", "x"])
async def test_a_limit_out_of_range_is_a_400(client: Client, limit: str) -> None:
    run_id = await create(client)
    response = await client.get(f"/v1/runs/{run_id}/events", params={"limit": limit})
    refused(response, "limit", "query")


@pytest.mark.parametrize(
    "key", ["", "a b", "tab\there", "bell\x07", "é", "k" * 256], ids=lambda k: repr(k[:8])
)
async def test_a_malformed_idempotency_key_is_a_400(client: Client, key: str) -> None:
    response = await client.post(
        "/v1/runs",
        content=b'{"task": "sleep", "input": {"seconds": 0}}',
        headers={**JSON, "Idempotency-Key": key.encode("latin-1")},
    )
    refused(response, "Idempotency-Key", "header")


async def test_the_longest_idempotency_key_is_accepted(client: Client) -> None:
    response = await client.post(
        "/v1/runs", json=sleep_body(0.01), headers={"Idempotency-Key": "~" * 255}
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("seconds", [b"0", b"-1", b"1e308", b"1e400", b"604801"])
async def test_an_absurd_timeout_is_a_400(client: Client, seconds: bytes) -> None:
    body = b'{"task": "sleep", "input": {"seconds": 0}, "timeout_seconds": ' + seconds + b"}"
    response = await client.post("/v1/runs", content=body, headers=JSON)
    refused(response, "timeout_seconds", "body")


async def test_metadata_beyond_its_limits_is_a_400(client: Client) -> None:
    many = {f"k{i}": "v" for i in range(65)}
    refused(await client.post("/v1/runs", json=sleep_body(0, metadata=many)), "metadata", "body")
    long_value = {"k": "v" * 1025}
    response = await client.post("/v1/runs", json=sleep_body(0, metadata=long_value))
    assert response.status_code == 400, response.text


async def test_a_huge_input_is_a_413(client: Client) -> None:
    body = sleep_body(0, metadata={"k": "v"})
    body["input"]["padding"] = "x" * (2 * 1024 * 1024)
    response = await client.post("/v1/runs", json=body)
    assert response.status_code == 413, response.text
    assert response.json()["status_code"] == 413


@pytest.mark.parametrize("suffix", ["", "/events", "/events/stream", "/cancel"])
async def test_a_malformed_run_id_is_a_404_that_does_not_echo_it(
    client: Client, suffix: str
) -> None:
    run_id = "%00%FF" + "a" * 20000
    method = client.post if suffix == "/cancel" else client.get
    response = await method(f"/v1/runs/{run_id}{suffix}")
    assert response.status_code == 404, response.text
    assert "aaaa" not in response.json()["detail"]
