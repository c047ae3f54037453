"""The README's Redis ACL rule is exactly enough: the service works under it.

The rule is read from the README's "Redis requirements" section and given to a user
of the test's own Redis. The whole service then runs as that user — start-up, a
create with an idempotency key and its replay, progress events, an event page after
a cursor, a stream, a cancel from the API, readiness, the reaper finishing a lost
worker's run, shutdown — and Redis's ``ACL LOG`` must hold no refusal afterwards.
``ACL LOG`` also records refusals the client ignores (redis-py drops an error to
``CLIENT SETINFO``) and commands run inside Lua scripts, so a command added to the
code but not to the README fails here.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Iterator
from typing import Any, Final

import pytest
import redis
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.metrics import Metrics
from service.reaper import Reaper
from service.store.redis import RedisRunStore
from service.web.app import create_app
from tests.conftest import AUTH, TOKEN, RedisServer
from tests.deploy.conftest import ROOT
from tests.integration.support import sleep_body, wait_for_run
from tests.integration.test_store_contract import created, progress

USER: Final = "quiesce"
PASSWORD: Final = "acl-test-password-0123456789"


def readme_acl_rules() -> list[str]:
    """The rules of the ``ACL SETUSER`` line in the README's "Redis requirements"."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Redis requirements")
    section = readme[start : readme.index("\n## ", start)]
    (line,) = re.findall(r"^\s*(ACL SETUSER .*)$", section, flags=re.MULTILINE)
    words = shlex.split(line)
    assert words[:3] == ["ACL", "SETUSER", USER]
    rules = words[3:]
    assert ">PASSWORD" in rules, "the password is a placeholder"
    return [f">{PASSWORD}" if rule == ">PASSWORD" else rule for rule in rules]


def acl_log(server: RedisServer) -> list[Any]:
    with server.client() as admin:
        entries: list[Any] = admin.execute_command("ACL", "LOG")
        return entries


@pytest.fixture
def acl_url(redis_server: RedisServer) -> Iterator[str]:
    """A user of the test's Redis with exactly the README's rules; its URL."""
    with redis_server.client() as admin:
        admin.execute_command("ACL", "SETUSER", USER, "reset", *readme_acl_rules())
        admin.execute_command("ACL", "LOG", "RESET")
    try:
        # Database 1: a URL naming a database other than 0 makes the client SELECT it.
        yield f"redis://{USER}:{PASSWORD}@127.0.0.1:{redis_server.port}/1"
    finally:
        with redis_server.client() as admin:
            admin.execute_command("ACL", "DELUSER", USER)
            admin.execute_command("ACL", "LOG", "RESET")


def test_the_rule_refuses_what_the_service_does_not_need(
    acl_url: str, redis_server: RedisServer
) -> None:
    """The check below can fail: the user is confined, and refusals reach ACL LOG."""
    with redis.Redis.from_url(acl_url) as confined:
        assert confined.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            confined.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            confined.hset("someone-else:key", "field", "value")
        with pytest.raises(redis.exceptions.NoPermissionError):
            confined.publish("someone-else:channel", "message")
    reasons = {entry[b"reason"] for entry in acl_log(redis_server)}
    assert reasons == {b"command", b"key", b"channel"}


async def test_the_service_runs_under_the_readme_rule(
    acl_url: str, redis_server: RedisServer
) -> None:
    settings = Settings(
        worker_id="acl-worker",
        api_token=TOKEN,
        shutdown_grace_seconds=0.5,
        log_format="json",
        redis_url=acl_url,
    )
    app = create_app(settings)
    async with AsyncTestClient(app) as client:
        client.headers.update(AUTH)
        assert (await client.get("/readyz")).status_code == 200

        headers = {"Idempotency-Key": "acl-check"}
        body = sleep_body(0.3, steps=3)
        created_run = await client.post("/v1/runs", json=body, headers=headers)
        assert created_run.status_code == 202, created_run.text
        run_id = created_run.json()["run_id"]
        replayed = await client.post("/v1/runs", json=body, headers=headers)
        assert replayed.headers.get("idempotent-replayed") == "true"
        # Opened while the run is running: the stream subscribes, tails, unsubscribes.
        stream = await client.get(f"/v1/runs/{run_id}/events/stream")
        assert stream.status_code == 200
        assert "event: run_succeeded" in stream.text
        assert (await wait_for_run(client, run_id))["status"] == "succeeded"

        page = (await client.get(f"/v1/runs/{run_id}/events")).json()
        first = page["events"][0]["id"]
        rest = (await client.get(f"/v1/runs/{run_id}/events", params={"after": first})).json()
        assert len(rest["events"]) == len(page["events"]) - 1 == 4  # 3 progress, 1 terminal

        long_run = (await client.post("/v1/runs", json=sleep_body(30))).json()["run_id"]
        assert (await client.post(f"/v1/runs/{long_run}/cancel")).status_code == 202
        assert (await wait_for_run(client, long_run))["status"] == "cancelled"

        # A retried run: requeue (run slot, then LPUSH and PUBLISH), adoption (LRANGE,
        # HMGET, SADD, the claim, LREM), then its last attempt's terminal write.
        retried = sleep_body(5, timeout_seconds=0.2, retry={"max_attempts": 2, "on": ["timeout"]})
        retried_id = (await client.post("/v1/runs", json=retried)).json()["run_id"]
        record = await wait_for_run(client, retried_id, within=10)
        assert (record["status"], record["attempt"]) == ("failed", 2)

    assert acl_log(redis_server) == []


async def test_watches_and_the_reaper_work_under_the_readme_rule(
    acl_url: str, redis_server: RedisServer
) -> None:
    store = RedisRunStore(acl_url, retention_seconds=3600)
    await store.start()
    try:
        lost = await created(store, worker_id="lost-worker")
        async with store.watch(lost.run_id) as watch:  # SUBSCRIBE, then UNSUBSCRIBE
            woken = asyncio.create_task(watch.wait())
            assert await store.append(lost.run_id, progress(1)) is not None
            await asyncio.wait_for(woken, 2.0)
        await store.heartbeat("lost-worker", 0.05)
        await asyncio.sleep(0.1)
        reaper = Reaper(
            store=store, metrics=Metrics(max_active_runs=1), worker_id="reaper", lease_ttl_seconds=3
        )
        assert await reaper.reap_expired() == 1
        record = await store.get(lost.run_id)
        assert record is not None
        assert record.error is not None
        assert record.error.reason == "worker_lost"
        assert await store.claim_idempotency("acl-claim", "fingerprint", "token") is None
        await store.release_idempotency("acl-claim", "token")
        await store.retire("reaper")
    finally:
        await store.close()
    assert acl_log(redis_server) == []
