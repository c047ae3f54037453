"""The console's HTTP side, without a browser: the shell and assets are served without a
token and with the strict headers; the data route ``/admin/runs`` has ``/v1``'s auth."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.schemas import RunRecord, utcnow
from service.web.app import create_app
from service.web.console import CONTENT_SECURITY_POLICY, _asset
from service.web.recent_runs import RecentRuns
from tests.conftest import AUTH

PAGES = ["/console", "/console/runs/run_aaaaaaaaaaaaaaaaaaaaaaaaaa"]
ASSETS = {
    "/console/static/console.js": "text/javascript",
    "/console/static/console.css": "text/css",
}


@pytest.fixture
async def client(settings: Settings) -> Any:
    async with AsyncTestClient(create_app(settings)) as test_client:
        yield test_client


def assert_strict_headers(headers: Any) -> None:
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


async def test_the_shell_and_assets_need_no_token_and_carry_the_policy(client: Any) -> None:
    for path in PAGES:
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        assert response.headers["cache-control"] == "no-store"
        assert_strict_headers(response.headers)
    for path, media_type in ASSETS.items():
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].split(";")[0] == media_type
        assert_strict_headers(response.headers)
    missing = await client.get("/console/static/other.js")
    assert missing.status_code == 404
    assert_strict_headers(missing.headers)


def test_the_policy_is_the_strict_one() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives == {
        "default-src": "'none'",
        "script-src": "'self'",
        "style-src": "'self'",
        "connect-src": "'self'",
        "img-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'self'",
        "frame-ancestors": "'none'",
    }


def test_the_assets_load_nothing_from_elsewhere_and_never_write_markup() -> None:
    html = _asset("console.html").decode()
    script = _asset("console.js").decode()
    css = _asset("console.css").decode()
    for text in (html, script, css):
        assert not re.search(r"(https?:)?//[a-z0-9]", text, re.IGNORECASE)
        assert "@import" not in text
    # Nothing inline for the policy to refuse: one external script, no style attributes.
    assert re.findall(r"<script[^>]*>", html) == [
        '<script type="module" src="/console/static/console.js">'
    ]
    assert "style=" not in html
    assert "<style" not in html
    # The sign-in field has no name, so not even a script-less submit can send it.
    token_input = re.search(r'<input id="token"[^>]*>', html)
    assert token_input is not None
    assert "name=" not in token_input.group(0)
    code = "\n".join(line for line in script.splitlines() if not line.strip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in code, sink
    assert "localStorage" not in code
    assert "document.cookie" not in code


async def test_recent_runs_need_the_token(client: Any) -> None:
    response = await client.get("/admin/runs")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_without_a_token_only_loopback_reads_runs(settings: Settings) -> None:
    app = create_app(replace(settings, api_token=None))
    async with AsyncTestClient(app) as test_client:  # its client address is not loopback
        assert (await test_client.get("/admin/runs")).status_code == 401
        assert (await test_client.get("/console")).status_code == 200


async def test_recent_runs_list_active_and_finished_runs(client: Any) -> None:
    client.headers.update(AUTH)
    done = (await client.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 0}})).json()
    running = await client.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 60}})
    running_id = running.json()["run_id"]
    for _ in range(200):
        body = (await client.get("/admin/runs")).json()
        if body["finished"]:
            break
        await asyncio.sleep(0.01)
    assert body["limit"] == 100
    assert [run["run_id"] for run in body["active"]] == [running_id]
    assert body["active"][0]["status"] == "running"
    assert [run["run_id"] for run in body["finished"]] == [done["run_id"]]
    assert body["finished"][0]["status"] == "succeeded"
    assert body["finished"][0]["finished_at"] is not None

    await client.post(f"/v1/runs/{running_id}/cancel")
    # The cancel is answered once requested; the run ends a moment later.
    for _ in range(200):
        body = (await client.get("/admin/runs")).json()
        if not body["active"]:
            break
        await asyncio.sleep(0.01)
    assert body["active"] == []
    assert [(run["run_id"], run["status"], run["reason"]) for run in body["finished"]] == [
        (running_id, "cancelled", "cancelled"),
        (done["run_id"], "succeeded", None),
    ]


def test_the_recent_list_is_bounded_newest_first() -> None:
    recent = RecentRuns(limit=3)
    now = utcnow()
    for n in range(5):
        recent.finished(
            RunRecord(
                run_id=f"run_{n}",
                task="sleep",
                status="succeeded",
                created_at=now,
                updated_at=now,
                finished_at=now,
                worker_id="w",
                timeout_seconds=1,
            )
        )
    assert [run.run_id for run in recent.newest_first()] == ["run_4", "run_3", "run_2"]
