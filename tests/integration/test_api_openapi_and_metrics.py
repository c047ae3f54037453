"""The OpenAPI document's routes and the metrics text (CONTRACT §5)."""

from __future__ import annotations

from tests.integration.api_support import (
    UNKNOWN_RUN,
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
