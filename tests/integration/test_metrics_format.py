"""/metrics is valid Prometheus text, as promtool (Prometheus' own linter) reads it."""

from __future__ import annotations

import subprocess
from typing import Any

from litestar.testing import AsyncTestClient

from tests.conftest import require_tool


async def test_promtool_finds_nothing_to_complain_about(client: AsyncTestClient[Any]) -> None:
    promtool = require_tool("promtool")
    # Exercise every kind of series first: runs, rejections, HTTP routes, unmatched paths.
    created = await client.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 0}})
    assert created.status_code == 202
    assert (await client.post("/v1/runs", json={"task": "nope"})).status_code == 422
    assert (await client.get("/no/such/path")).status_code == 404
    await client.get(f"/v1/runs/{created.json()['run_id']}")
    text = (await client.get("/metrics")).text
    assert "quiesce_active_runs" in text
    series = 'quiesce_http_requests_total{method="GET",route="/v1/runs/{run_id}",status="200"}'
    assert series in text

    result = subprocess.run(  # noqa: ASYNC221 - a short, bounded lint of a string
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""
    assert result.stderr.strip() == ""
