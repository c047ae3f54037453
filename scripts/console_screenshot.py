"""Re-make the README's console screenshots from the real thing.

Starts a Redis and ``quiesce serve`` (as the browser tests do, with a token), creates a
few runs that end in each way and a few that keep running, signs in through the form in
headless Chromium and saves the replica's page and one run's page (1200x800 PNGs).

    .venv/bin/python scripts/console_screenshot.py [OUTPUT_DIR]   # default: docs/
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.browser.chromium import find_chromium, launch  # noqa: E402
from tests.browser.conftest import ECHO_TASK_ENV, VIEWPORT, sign_in  # noqa: E402
from tests.conftest import AUTH, TOKEN, RedisServer, free_port  # noqa: E402
from tests.e2e.conftest import Server, start_server, stop  # noqa: E402


def create(server: Server, body: dict[str, object]) -> str:
    response = httpx.post(f"{server.url}/v1/runs", json=body, headers=AUTH)
    response.raise_for_status()
    run_id: str = response.json()["run_id"]
    return run_id


def wait_until_idle(server: Server, keep: set[str]) -> None:
    """Until only the runs in ``keep`` are active (the others have finished)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = httpx.get(f"{server.url}/admin/state", headers=AUTH).json()
        if {run["run_id"] for run in state["active_runs"]} <= keep:
            return
        time.sleep(0.1)
    raise SystemExit("the finished runs did not finish")


def make_runs(server: Server) -> str:
    """Runs in every state; returns the id of the one whose page is shown."""
    create(server, {"task": "sleep", "input": {"seconds": 0.2}, "metadata": {"order": "A-1041"}})
    create(server, {"task": "echo", "input": {"text": "hello"}, "metadata": {"source": "ci"}})
    create(server, {"task": "sleep", "input": {"seconds": 30}, "timeout_seconds": 0.5})
    cancelled = create(server, {"task": "sleep", "input": {"seconds": 30}})
    httpx.post(f"{server.url}/v1/runs/{cancelled}/cancel", headers=AUTH).raise_for_status()
    shown = create(
        server,
        {
            "task": "sleep",
            "input": {"seconds": 1200, "steps": 400},
            "metadata": {"order": "A-1042", "customer": "<b>not bold</b>"},
        },
    )
    busy = {shown, create(server, {"task": "sleep", "input": {"seconds": 900}})}
    wait_until_idle(server, busy)
    time.sleep(7.5)  # a few progress events and ages that are not all zero
    return shown


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs"
    output.mkdir(parents=True, exist_ok=True)
    chromium = find_chromium()
    redis_binary = shutil.which("redis-server")
    if chromium is None or redis_binary is None:
        raise SystemExit("needs chromium (/usr/bin/chromium) and redis-server")
    redis = RedisServer(binary=redis_binary, port=free_port())
    redis.start()
    with tempfile.TemporaryDirectory() as scratch:
        server = start_server(
            Path(scratch),
            redis.url,
            QUIESCE_API_TOKEN=TOKEN,
            QUIESCE_WORKER_ID="quiesce-7c9d5b8f4-x2k4q",
            QUIESCE_MAX_ACTIVE_RUNS="20",
            **ECHO_TASK_ENV,
        )
        try:
            shown = make_runs(server)
            with launch(chromium) as browser:
                page = browser.new_page(viewport=VIEWPORT)
                sign_in(page, server)
                page.wait_for_selector("#recent tr")
                page.screenshot(path=str(output / "console.png"))
                page.goto(f"{server.url}/console/runs/{shown}")
                page.wait_for_selector("#events li >> nth=3")
                page.screenshot(path=str(output / "console-run.png"))
        finally:
            stop(server)
            redis.stop()
    for name in ("console.png", "console-run.png"):
        path = output / name
        print(f"{path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
