"""A command Redis refuses (an ACL without it, a read-only replica, maxmemory) is a
store outage to clients — 503 with Retry-After — never a 500.

The refusals are made real on the test's own Redis: a user whose ACL lacks a
command, and a server whose maxmemory is reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.web.app import create_app
from tests.conftest import AUTH, TOKEN, RedisServer
from tests.deploy.test_redis_acl import readme_acl_rules
from tests.integration.support import metric, metrics_text, sleep_body

USER: Final = "quiesce-refused"
PASSWORD: Final = "refusal-test-password-0123456789"


def _user_url(redis_server: RedisServer, *rules: str) -> Iterator[str]:
    with redis_server.client() as admin:
        admin.execute_command("ACL", "SETUSER", USER, "reset", *rules)
    try:
        yield f"redis://{USER}:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    finally:
        with redis_server.client() as admin:
            admin.execute_command("ACL", "DELUSER", USER)
            admin.execute_command("ACL", "LOG", "RESET")


@pytest.fixture
def no_xadd_url(redis_server: RedisServer) -> Iterator[str]:
    """The README's rule less XADD, which the create script calls."""
    rules = [r for r in readme_acl_rules() if r != "+xadd"]
    rules = [f">{PASSWORD}" if r.startswith(">") else r for r in rules]
    yield from _user_url(redis_server, *rules)


@pytest.fixture
def no_ping_url(redis_server: RedisServer) -> Iterator[str]:
    """The README's rule less PING, which readiness sends."""
    rules = [r for r in readme_acl_rules() if r != "+ping"]
    rules = [f">{PASSWORD}" if r.startswith(">") else r for r in rules]
    yield from _user_url(redis_server, *rules)


def _settings(url: str) -> Settings:
    return Settings(
        worker_id="refused-worker",
        api_token=TOKEN,
        shutdown_grace_seconds=0.5,
        log_format="json",
        redis_url=url,
    )


async def test_a_script_command_refused_by_the_acl_is_a_503(no_xadd_url: str) -> None:
    async with AsyncTestClient(create_app(_settings(no_xadd_url))) as client:
        client.headers.update(AUTH)
        response = await client.post("/v1/runs", json=sleep_body(0.1))
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"].isdigit()
        assert "refused" in response.json()["detail"]
        text = await metrics_text(client)
        assert metric(text, "quiesce_runs_rejected_total", reason="store_unavailable") == 1
        assert (metric(text, "quiesce_store_errors_total", operation="create") or 0) >= 1


async def test_readiness_refused_by_the_acl_reads_store_unavailable(no_ping_url: str) -> None:
    async with AsyncTestClient(create_app(_settings(no_ping_url))) as client:
        response = await client.get("/readyz")
        assert response.status_code == 503, response.text
        assert response.json()["status"] == "store_unavailable"


async def test_a_full_redis_is_a_503_not_a_500(redis_server: RedisServer) -> None:
    settings = _settings(redis_server.url)
    async with AsyncTestClient(create_app(settings)) as client:
        client.headers.update(AUTH)
        with redis_server.client() as admin:
            admin.config_set("maxmemory", "1")  # below what is used: every write refused
        try:
            response = await client.post("/v1/runs", json=sleep_body(0.1))
        finally:
            with redis_server.client() as admin:
                admin.config_set("maxmemory", "0")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"].isdigit()
