"""``quiesce check`` proves the store works, and says when Redis may lose runs.

Each test runs the real command as a subprocess against a redis-server of its own
(the session's, or one started here with the settings under test).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import structlog
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.store.redis import _SCRIPTS
from service.web.app import create_app
from tests.conftest import RedisServer, free_port, require_tool
from tests.integration.test_cli_and_logs import run_cli


@contextmanager
def redis_with(*args: str) -> Iterator[str]:
    """A redis-server started with extra settings; its URL."""
    port = free_port()
    process = subprocess.Popen(
        [require_tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=port, socket_connect_timeout=0.2) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_check_makes_a_round_trip_and_reports_the_server(redis_server: RedisServer) -> None:
    with redis_server.client() as client:
        client.script_flush()
        result = run_cli("check", QUIESCE_REDIS_URL=redis_server.url)
        assert result.returncode == 0, result.stderr
        version = client.info("server")["redis_version"]
        # Every script the store calls is in the server's cache; the probe key is gone.
        assert client.script_exists(*(s.sha for s in _SCRIPTS.values())) == [True] * len(_SCRIPTS)
        assert client.keys("quiesce:check:*") == []
    assert (
        f"store: redis reachable (version {version}); probe key written, read and deleted; "
        "scripts loaded"
    ) in result.stdout
    # The session's Redis evicts nothing and persists nothing.
    assert "redis: maxmemory-policy noeviction; persistence rdb save off, aof off" in result.stdout
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: persistence is off")


def test_check_warns_about_eviction_and_missing_persistence() -> None:
    with redis_with("--maxmemory-policy", "allkeys-lru", "--save", "", "--appendonly", "no") as url:
        result = run_cli("check", QUIESCE_REDIS_URL=url)
    assert result.returncode == 0, result.stderr
    assert "redis: maxmemory-policy allkeys-lru" in result.stdout
    assert (
        "warning: maxmemory-policy is allkeys-lru: set maxmemory-policy noeviction"
    ) in result.stdout
    assert "warning: persistence is off" in result.stdout
    assert "set appendonly yes" in result.stdout


def test_check_is_quiet_about_a_server_that_keeps_its_data(tmp_path: Path) -> None:
    with redis_with("--appendonly", "yes", "--dir", str(tmp_path)) as url:
        result = run_cli("check", QUIESCE_REDIS_URL=url)
    assert result.returncode == 0, result.stderr
    assert "aof on" in result.stdout
    assert "warning:" not in result.stdout


def test_check_fails_in_one_line_when_nothing_listens() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    line = one_line_failure(run_cli("check", "--timeout", "2", QUIESCE_REDIS_URL=url))
    assert line.startswith("store: redis unreachable:")


def test_check_fails_in_one_line_on_a_wrong_password(redis_server: RedisServer) -> None:
    with redis_server.client() as client:
        client.acl_setuser(
            "checker", enabled=True, passwords=["+right-password"], commands=["+@all"]
        )
    try:
        url = redis_server.url.replace("redis://", "redis://checker:wrong-password@")
        line = one_line_failure(run_cli("check", QUIESCE_REDIS_URL=url))
        assert line.startswith("store: redis authentication failed:")
    finally:
        with redis_server.client() as client:
            client.acl_deluser("checker")


@pytest.mark.parametrize(
    ("refused", "reason"),
    [
        (["-script"], "store: redis loading the claim script was refused:"),
        (["-evalsha"], "store: redis calling a script (EVALSHA) was refused:"),
    ],
)
def test_check_fails_in_one_line_when_the_acl_refuses_scripts(
    redis_server: RedisServer, refused: list[str], reason: str
) -> None:
    with redis_server.client() as client:
        client.acl_setuser(
            "checker",
            enabled=True,
            passwords=["+pw-0123456789"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", *refused],
        )
    try:
        url = redis_server.url.replace("redis://", "redis://checker:pw-0123456789@")
        line = one_line_failure(run_cli("check", QUIESCE_REDIS_URL=url))
        assert line.startswith(reason), line
        assert "permission" in line
    finally:
        with redis_server.client() as client:
            client.acl_deluser("checker")


def test_check_fails_in_one_line_on_a_read_only_replica(redis_server: RedisServer) -> None:
    with redis_with("--replicaof", "127.0.0.1", str(redis_server.port), "--save", "") as url:
        line = one_line_failure(run_cli("check", QUIESCE_REDIS_URL=url))
    assert line.startswith("store: redis the server refused a write (a read-only replica?)")


async def test_start_up_warns_when_redis_may_lose_runs(settings: Settings) -> None:
    with redis_with("--maxmemory-policy", "volatile-lru", "--save", "") as url:
        app = create_app(replace(settings, redis_url=url))
        with structlog.testing.capture_logs() as logs:
            async with AsyncTestClient(app):
                deadline = time.monotonic() + 5
                while len([e for e in logs if e["event"] == "redis_setting_warning"]) < 2:
                    assert time.monotonic() < deadline, logs
                    await asyncio.sleep(0.05)
    warnings = {e["setting"]: e for e in logs if e["event"] == "redis_setting_warning"}
    assert set(warnings) == {"maxmemory-policy", "persistence"}
    assert warnings["maxmemory-policy"]["log_level"] == "warning"
    assert "set maxmemory-policy noeviction" in warnings["maxmemory-policy"]["detail"]
    assert "set appendonly yes" in warnings["persistence"]["detail"]


def test_check_says_what_it_could_not_read_when_config_and_info_are_refused(
    redis_server: RedisServer,
) -> None:
    """Managed Redis and tight ACLs refuse CONFIG (and sometimes INFO): the check still
    passes, and says which settings it could not verify."""
    with redis_server.client() as client:
        client.acl_setuser(
            "checker",
            enabled=True,
            passwords=["+pw-0123456789"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-config", "-info"],
        )
    try:
        url = redis_server.url.replace("redis://", "redis://checker:pw-0123456789@")
        result = run_cli("check", QUIESCE_REDIS_URL=url)
    finally:
        with redis_server.client() as client:
            client.acl_deluser("checker")
    assert result.returncode == 0, result.stderr
    assert "store: redis reachable (version unknown)" in result.stdout
    assert "redis: maxmemory-policy unknown; persistence rdb save unknown, aof unknown" in (
        result.stdout
    )
    assert "warning: maxmemory-policy could not be checked" in result.stdout
    assert "warning: persistence could not be checked" in result.stdout
