"""Idempotency-Key on create (CONTRACT §1): replay, mismatch, bounds, in progress."""

from __future__ import annotations

import json

from service.scheduler import run_id_for_key
from service.schemas import request_decoder, request_fingerprint
from tests.integration.api_support import (
    post_raw,
    rejected,
)
from tests.integration.support import (
    Client,
    metric,
    metrics_text,
    services,
    sleep_body,
    wait_for_run,
)


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
