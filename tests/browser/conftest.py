"""The console in a real browser: the system Chromium, driven by Playwright, against the
real server (``quiesce serve`` under Granian, see tests/e2e) with an API token set.

Every page is watched: each URL the browser requests, each request that would leave the
server under test (aborted and recorded), and each JavaScript dialog (dismissed and
recorded). ``Watch.assert_clean`` checks them at the end of a test.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser.chromium import find_chromium, launch
from tests.conftest import REPO, REQUIRE_TOOLS, TOKEN, RedisServer
from tests.e2e.conftest import Server, start_server, stop

#: What the echo task (tests/browser/echo_tasks.py) needs to be loaded by the server.
ECHO_TASK_ENV = {"PYTHONPATH": str(REPO), "QUIESCE_TASK_MODULES": "tests.browser.echo_tasks"}
VIEWPORT = {"width": 1200, "height": 800}


def _unavailable(reason: str) -> None:
    if REQUIRE_TOOLS:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser's path; the tests skip without one (and fail in CI, which installs it)."""
    if importlib.util.find_spec("playwright") is None:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    path = find_chromium()
    if path is None:
        _unavailable(
            "no Chromium found at /usr/bin/chromium or $QUIESCE_CHROMIUM "
            "(apt-get install chromium; never `playwright install`)"
        )
    assert path is not None
    return path


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import expect

    # How long an expectation waits for the page (not a measurement): room for a slow CI.
    expect.set_options(timeout=15_000)
    with launch(chromium) as instance:
        yield instance


def start_console_server(tmp_path: Path, redis_url: str) -> Server:
    return start_server(tmp_path, redis_url, QUIESCE_API_TOKEN=TOKEN, **ECHO_TASK_ENV)


@pytest.fixture
def server(tmp_path: Path, redis_server: RedisServer) -> Iterator[Server]:
    instance = start_console_server(tmp_path, redis_server.url)
    yield instance
    stop(instance)


@dataclass
class Watch:
    """What a page did besides what the test sees on it."""

    origin: str
    requested: list[str] = field(default_factory=list)
    offsite: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.requested, "the page requested nothing: the watch saw nothing"
        assert self.offsite == [], f"requests that would have left the server: {self.offsite}"
        assert self.dialogs == [], f"a script opened dialogs: {self.dialogs}"
        leaked = [url for url in self.requested if TOKEN in url]
        assert leaked == [], f"the token appeared in a URL: {leaked}"


@pytest.fixture
def watched(browser: Any, server: Server) -> Iterator[tuple[Any, Watch]]:
    """A fresh tab (its own session storage) on the console's server, watched."""
    context = browser.new_context(viewport=VIEWPORT, service_workers="block")
    watch = Watch(origin=server.url)
    own = urlsplit(server.url).netloc

    def route(route: Any) -> None:
        if urlsplit(route.request.url).netloc == own:
            route.continue_()
        else:
            watch.offsite.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("request", lambda request: watch.requested.append(request.url))

    def dialog(dialog: Any) -> None:
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", dialog)
    yield page, watch
    context.close()


def sign_in(page: Any, server: Server, path: str = "/console", token: str = TOKEN) -> None:
    """Open ``path`` and sign in through the form."""
    from playwright.sync_api import expect

    page.goto(server.url + path)
    expect(page.locator("#sign-in")).to_be_visible()
    page.fill("#token", token)
    page.click("#sign-in button[type=submit]")
