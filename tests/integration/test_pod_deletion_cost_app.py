"""The app keeps its pod's deletion cost in step with its runs (the lifespan wiring),
and an API server that refuses it costs the service nothing but a log line."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
from litestar.testing import AsyncTestClient

from service.config import PodDeletionCostSettings, Settings
from service.web.app import create_app
from tests.conftest import AUTH
from tests.integration.fake_kube_api import ANNOTATION, NAMESPACE, POD, FakeKubeAPI, make_sa_dir
from tests.integration.support import metric, metrics_text, sleep_body

TOKEN = "eyJhbGciOiJSUzI1NiJ9.app-token-value.signature"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeKubeAPI]:
    ca = trustme.CA()
    server = FakeKubeAPI(ca=ca, sa_dir=make_sa_dir(tmp_path / "sa", ca, TOKEN))
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def app_settings(settings: Settings, api: FakeKubeAPI) -> Settings:
    cost = PodDeletionCostSettings(
        interval_seconds=1.0,
        api_url=api.url,
        namespace=NAMESPACE,
        pod_name=POD,
        token_file=str(api.sa_dir / "token"),
        ca_file=str(api.sa_dir / "ca.crt"),
    )
    return dataclasses.replace(settings, worker_id=POD, pod_deletion_cost=cost)


def annotation_is(value: str) -> Any:
    return lambda api: api.annotations.get(ANNOTATION) == value


async def test_the_annotation_follows_the_active_runs(
    app_settings: Settings, api: FakeKubeAPI
) -> None:
    async with AsyncTestClient(create_app(app_settings)) as client:
        client.headers.update(AUTH)
        await api.wait_for(annotation_is("0"))
        created = await client.post("/v1/runs", json=sleep_body(60))
        assert created.status_code == 202, created.text
        await api.wait_for(annotation_is("1"))
        cancelled = await client.post(f"/v1/runs/{created.json()['run_id']}/cancel")
        assert cancelled.status_code == 202
        await api.wait_for(annotation_is("0"))
        # The fake server has the value before the client has read its answer.
        for _ in range(200):
            text = await metrics_text(client)
            if metric(text, "quiesce_pod_deletion_cost_updates_total", outcome="updated") == 3:
                break
            await asyncio.sleep(0.01)
    assert api.patched_values() == ["0", "1", "0"]
    assert metric(text, "quiesce_pod_deletion_cost_updates_total", outcome="updated") == 3


async def test_a_refusing_api_server_is_logged_and_counted_and_the_app_serves(
    app_settings: Settings, api: FakeKubeAPI
) -> None:
    api.status = 403
    app = create_app(app_settings)  # configures logging; capture_logs then takes over
    with structlog.testing.capture_logs() as logs:
        async with AsyncTestClient(app) as client:
            client.headers.update(AUTH)
            await api.wait_for(lambda api: len(api.requests) >= 1)
            created = await client.post("/v1/runs", json=sleep_body(0.01))
            assert created.status_code == 202, created.text
            assert (await client.get("/readyz")).status_code == 200
            for _ in range(200):  # counted once the client has read the refusal
                text = await metrics_text(client)
                if metric(text, "quiesce_pod_deletion_cost_updates_total", outcome="failed"):
                    break
                await asyncio.sleep(0.01)
    failed = metric(text, "quiesce_pod_deletion_cost_updates_total", outcome="failed")
    assert failed is not None
    assert failed >= 1
    failures = [line for line in logs if line["event"] == "pod_deletion_cost_failed"]
    assert failures
    assert failures[0]["status"] == 403
    assert failures[0]["reason"] == "Forbidden"
    assert TOKEN not in repr(logs)
    assert any(line["event"] == "stopped" for line in logs)
