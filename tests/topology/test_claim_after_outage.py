"""A key's retry after a store outage gets the key, not 409: the failed create's claim
release is sent ahead of the retry's claim.

The failover case: a create's claim reached the master and its replica; the master
died before the create; the release of the claim could not be sent. The promoted
replica holds the claim. Without the release going first, the client's retry would
read "pending" (409) until the claim expires.
"""

from __future__ import annotations

import asyncio

import pytest
import redis

from service.errors import StoreUnavailable
from service.scheduler import run_id_for_key
from service.store import redis as redis_store
from service.store.redis import RedisRunStore, run_key
from tests.conftest import RedisServer

pytestmark = pytest.mark.topology


async def test_a_retry_after_an_outage_is_claimed_not_pending(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The release's own repeats wait long here, so only the retry's claim can send it.
    monkeypatch.setattr(redis_store, "RELEASE_RETRY_SECONDS", 60.0)
    run_id = run_id_for_key("retried-after-outage")
    store = RedisRunStore(redis_server.url, retention_seconds=3600)
    await store.start()
    try:
        assert await store.claim_idempotency(run_id, "fingerprint", "first-request") is None
        redis_server.stop()
        releasing = asyncio.create_task(store.release_idempotency(run_id, "first-request"))
        await asyncio.sleep(0.5)  # its first attempt has failed
        assert not releasing.done()
        redis_server.start()
        # The replica kept the claim: write it back as it was.
        with redis.Redis(port=redis_server.port) as client:
            client.hset(
                run_key(run_id), mapping={"fingerprint": "fingerprint", "token": "first-request"}
            )
        claimed = None
        for _ in range(20):  # the store reconnects
            try:
                claimed = await store.claim_idempotency(run_id, "fingerprint", "the-retry")
                break
            except StoreUnavailable:
                await asyncio.sleep(0.1)
        assert claimed is None  # claimed: not IdempotencyInProgress
        with redis.Redis(port=redis_server.port) as client:
            assert client.hget(run_key(run_id), "token") == b"the-retry"
        releasing.cancel()
    finally:
        await store.close()
