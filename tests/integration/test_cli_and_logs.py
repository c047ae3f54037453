"""``quiesce check`` and ``quiesce drain`` as commands, and what the logs carry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import structlog
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.web.app import create_app
from tests.conftest import AUTH, TOKEN, RedisServer, free_port

QUIESCE = str(Path(sys.executable).parent / "quiesce")


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QUIESCE, *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_reaches_redis(redis_server: RedisServer) -> None:
    result = run_cli("check", QUIESCE_REDIS_URL=redis_server.url)
    assert result.returncode == 0, result.stderr
    assert "store: redis reachable" in result.stdout
    assert "tasks: http, sleep" in result.stdout


def test_check_fails_when_redis_is_unreachable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    result = run_cli("check", "--timeout", "2", QUIESCE_REDIS_URL=url)
    assert result.returncode == 1
    assert "store: redis unreachable" in result.stderr


def test_check_with_the_memory_store_and_a_bad_setting() -> None:
    assert run_cli("check").returncode == 0
    bad = run_cli("check", QUIESCE_MAX_ACTIVE_RUNS="lots")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "configuration error: QUIESCE_MAX_ACTIVE_RUNS: expected a whole number, got 'lots'"
    ]


def test_drain_without_a_server_fails_clearly() -> None:
    result = run_cli("drain", "--timeout", "2", PORT=str(free_port()))
    assert result.returncode == 1
    assert "drain: no answer from http://127.0.0.1:" in result.stderr


async def test_run_logs_carry_the_run_id_and_never_the_token_or_input(
    settings: Settings,
) -> None:
    secret_input = "do-not-log-this-value"
    app = create_app(settings)  # configures logging; capture_logs then takes over
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        async with AsyncTestClient(app) as client:
            client.headers.update(AUTH)
            created = await client.post(
                "/v1/runs",
                json={"task": "sleep", "input": {"seconds": 0}, "metadata": {"x": secret_input}},
            )
            run_id = created.json()["run_id"]
            failed = await client.post(
                "/v1/runs", json={"task": "sleep", "input": {"seconds": secret_input}}
            )
            assert failed.status_code == 400
            await client.get(f"/v1/runs/{run_id}/events/stream")  # ends at the terminal event
    run_events = [e for e in logs if e.get("run_id") == run_id]
    assert {e["event"] for e in run_events} >= {"run_started", "run_finished"}
    assert all(e["task"] == "sleep" for e in run_events)
    flat = repr(logs)
    assert TOKEN not in flat
    assert secret_input not in flat
