"""The console in headless Chromium against the real server with a token: sign-in, live
events, cancel, the drain, and hostile values shown as text that runs nothing."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.browser.conftest import Watch, sign_in
from tests.conftest import AUTH, TOKEN
from tests.e2e.conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Would set the flag and open a dialog if the page ever treated data as markup.
HOSTILE = "<script>window.__pwned=1;alert(1)</script><img src=x onerror=window.__pwned=2;alert(2)>"


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def create(server: Server, task: str, task_input: dict[str, Any], **extra: Any) -> str:
    response = httpx.post(
        f"{server.url}/v1/runs", json={"task": task, "input": task_input, **extra}, headers=AUTH
    )
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    return run_id


def read(server: Server, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/runs/{run_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


def progress_so_far(server: Server, run_id: str) -> int:
    response = httpx.get(f"{server.url}/v1/runs/{run_id}/events", headers=AUTH)
    assert response.status_code == 200, response.text
    return sum(1 for event in response.json()["events"] if event["type"] == "run_progress")


def wait_finished(server: Server, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        record = read(server, run_id)
        if record["status"] != "running":
            return record
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish")


def test_sign_in_keeps_the_token_in_the_tab_only(
    watched: tuple[Any, Watch], server: Server
) -> None:
    page, watch = watched
    sign_in(page, server, token="not-the-token")
    expect(page.locator("#message")).to_have_text("a valid bearer token is required")
    expect(page.locator("#sign-in")).to_be_visible()

    page.fill("#token", TOKEN)
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#overview")).to_be_visible()
    expect(page.locator("#state")).to_have_text("ready")
    expect(page.locator("#worker")).to_have_text("e2e-worker")
    assert page.evaluate("sessionStorage.getItem('quiesce.token')") == TOKEN
    assert page.evaluate("document.cookie") == ""
    assert page.context.cookies() == []
    assert page.evaluate("localStorage.length") == 0
    watch.assert_clean()


def test_run_page_shows_progress_live_and_cancels(
    watched: tuple[Any, Watch], server: Server
) -> None:
    page, watch = watched
    # Two seconds a step: the page is open long before the run ends.
    run_id = create(server, "sleep", {"seconds": 600, "steps": 300})
    sign_in(page, server, f"/console/runs/{run_id}")
    expect(page.locator("#run-id")).to_have_text(run_id)
    expect(page.locator("#stream-state")).to_have_text("(live)")
    expect(page.locator("#run-status")).to_have_text("running")
    page.evaluate("window.__samePage = true")

    # Emitted after the page was open and streaming: it can only arrive live.
    next_step = progress_so_far(server, run_id) + 1
    events = page.locator("#events li")
    expect(events.filter(has_text=f'{{"step":{next_step},"of":300}}')).to_have_count(1)
    assert page.evaluate("window.__samePage") is True  # no reload brought it
    expect(page.locator("#run-status")).to_have_text("running")

    page.click("#cancel")
    expect(page.locator("#run-status")).to_have_text("cancelled")
    expect(events.filter(has_text="run_cancelled")).to_have_count(1)
    expect(page.locator("#stream-state")).to_have_text("(ended)")
    expect(page.locator("#cancel")).to_be_disabled()
    record = read(server, run_id)
    assert record["status"] == "cancelled"
    assert record["error"]["reason"] == "cancelled"
    watch.assert_clean()


def test_overview_lists_runs_and_flips_to_draining(
    watched: tuple[Any, Watch], server: Server
) -> None:
    page, watch = watched
    finished = create(server, "sleep", {"seconds": 0})
    assert wait_finished(server, finished)["status"] == "succeeded"
    active = create(server, "sleep", {"seconds": 600})

    sign_in(page, server)
    expect(page.locator("#state")).to_have_text("ready")
    expect(page.locator("#drain")).to_have_text("not draining")
    expect(page.locator("#active")).to_contain_text(active)
    expect(page.locator("#capacity")).to_have_text("1 of 100 runs")
    recent = page.locator("#recent tr", has_text=finished)
    expect(recent).to_contain_text("succeeded")
    expect(recent.locator("a")).to_have_attribute("href", f"/console/runs/{finished}")

    response = httpx.post(f"{server.url}/admin/drain", headers=AUTH)
    assert response.status_code == 202, response.text
    expect(page.locator("#state")).to_have_text("draining")
    expect(page.locator("#drain")).to_contain_text("admin since")
    watch.assert_clean()


def test_hostile_values_are_shown_as_text_and_run_nothing(
    watched: tuple[Any, Watch], server: Server
) -> None:
    page, watch = watched
    run_id = create(server, "echo", {"text": HOSTILE}, metadata={"note": HOSTILE})
    assert wait_finished(server, run_id)["status"] == "succeeded"

    sign_in(page, server, f"/console/runs/{run_id}")
    expect(page.locator("#stream-state")).to_have_text("(ended)")
    expect(page.locator("#run-status")).to_have_text("succeeded")
    facts = page.locator("#run-facts").inner_text()
    assert facts.count(HOSTILE) == 2  # the metadata and the output, literally
    events = page.locator("#events").inner_text()
    assert events.count(HOSTILE) == 2  # the progress event and run_succeeded's output

    page.goto(f"{server.url}/console")  # the same tab: still signed in
    expect(page.locator("#recent")).to_contain_text(run_id)

    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 1  # console.js, and nothing the data made
    assert not [url for url in watch.requested if url.rstrip("/").endswith("/x")]
    watch.assert_clean()
