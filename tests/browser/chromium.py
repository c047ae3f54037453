"""Headless Chromium for the console tests and the README's screenshot.

The system browser (Debian's ``chromium``) is driven by Playwright; Playwright's own
browser download is never used (it needs the network and fails in CI). Everything
that could make the browser talk to anything but the server under test is off.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Where Debian puts it; ``QUIESCE_CHROMIUM`` names another.
DEFAULT_CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("QUIESCE_CHROMIUM"), DEFAULT_CHROMIUM):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


@contextmanager
def launch(executable: str) -> Iterator[Any]:
    """A Playwright ``Browser`` on the system Chromium at ``executable``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
