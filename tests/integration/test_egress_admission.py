"""Targets the egress policy refuses are a 400 at create, naming the field — for the
``http`` task's ``input.url`` and for ``callback_url`` — and never a run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.web.app import create_app
from tests.conftest import AUTH
from tests.integration.support import metric, metrics_text

REFUSED = [
    "http://0177.0.0.1/",  # octal loopback: accepted at create before, failed later
    "http://0x7f.1/",
    "http://127.1/",
    "http://2130706433/",
    "http://[64:ff9b::127.0.0.1]/",
    "http://[64:ff9b:1::10.0.0.1]/",
    "http://[2002:a9fe:a9fe::]/",
    "http://[::127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
    "http://[fe80::1%25eth0]/",
    "http://a%20b/",
    "http://example.com:0/",
    "http://[zz]/",
]


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(create_app(settings)) as test_client:
        test_client.headers.update(AUTH)
        yield test_client


@pytest.mark.parametrize("url", REFUSED)
async def test_an_http_task_url_the_policy_refuses_is_400_naming_input_url(
    client: AsyncTestClient[Any], url: str
) -> None:
    response = await client.post("/v1/runs", json={"task": "http", "input": {"url": url}})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["extra"][0]["key"] == "input.url"
    assert "$.input.url" in body["detail"]
    text = await metrics_text(client)
    assert metric(text, "quiesce_runs_started_total", task="http") == 0
    assert metric(text, "quiesce_runs_rejected_total", reason="invalid") == 1


@pytest.mark.parametrize("url", REFUSED)
async def test_a_callback_url_the_policy_refuses_is_400_naming_callback_url(
    client: AsyncTestClient[Any], url: str
) -> None:
    body = {"task": "sleep", "input": {"seconds": 0}, "callback_url": url}
    response = await client.post("/v1/runs", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["extra"][0]["key"] == "callback_url"
    assert "$.callback_url" in response.json()["detail"]
    text = await metrics_text(client)
    assert metric(text, "quiesce_runs_started_total", task="sleep") == 0
    assert metric(text, "quiesce_runs_rejected_total", reason="invalid") == 1
