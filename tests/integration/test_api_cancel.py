"""POST /v1/runs/{run_id}/cancel (CONTRACT §1)."""

from __future__ import annotations

from tests.integration.api_support import (
    create,
    finished_run,
)
from tests.integration.support import (
    Client,
    metric,
    metrics_text,
    sleep_body,
    wait_for_run,
)


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
