"""The group commit merges the worker-list SADDs of a pipeline of creates, in order."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from service.store.redis_commands import CommandPipeline
from tests.conftest import RedisServer


async def test_concurrent_sadds_land_as_one_and_keep_their_order_around_an_srem(
    redis_server: RedisServer,
) -> None:
    redis = Redis.from_url(redis_server.url)
    pipeline = CommandPipeline(redis, scripts=(), timeout=2.0, max_in_flight=1)
    await redis.config_resetstat()
    try:
        # One flusher: all of these travel in one pipeline, in this order.
        jobs = [
            pipeline.run([("SADD", "w", "a"), ("SET", "k1", "1")]),
            pipeline.run([("SADD", "w", "b"), ("SET", "k2", "2")]),
            pipeline.run([("SREM", "w", "a", "c")]),
            pipeline.run([("SADD", "w", "c")]),
            pipeline.run([("SMEMBERS", "w")]),
            pipeline.run([("SADD", "other", "x", "y")]),
        ]
        replies = await asyncio.gather(*jobs)
        # The SREM saw a and b (a removed; c not there yet): no SADD moved ahead of it.
        assert replies[2] == [1]
        assert replies[4] == [{b"b", b"c"}]
        assert replies[0][1] is True
        assert replies[1][1] is True
        assert await redis.smembers("w") == {b"b", b"c"}
        assert await redis.smembers("other") == {b"x", b"y"}
        # a+b merged, c after the SREM on its own, and the other key's: three SADDs.
        assert await sadd_calls(redis) == 3
    finally:
        await pipeline.close()
        await redis.aclose()


async def test_every_create_of_a_burst_is_listed_under_its_worker(
    redis_server: RedisServer,
) -> None:
    from service.runs.admission import new_run_id
    from service.schemas import RunRecord, RunStarted, RunStartedData, utcnow
    from service.store.redis import RedisRunStore, worker_runs_key

    store = RedisRunStore(redis_server.url, retention_seconds=3600)
    await store.start()
    try:
        now = utcnow()
        records = [
            RunRecord(
                run_id=new_run_id(),
                task="sleep",
                status="running",
                created_at=now,
                updated_at=now,
                worker_id="w1",
                timeout_seconds=60,
            )
            for _ in range(200)
        ]
        started = RunStarted(created_at=now, data=RunStartedData(worker_id="w1"))
        counter = Redis.from_url(redis_server.url)
        await counter.config_resetstat()
        await asyncio.gather(*(store.create(record, started) for record in records))
        members = await store.runs_of("w1")
        assert members == sorted(record.run_id for record in records)
        try:
            assert await counter.scard(worker_runs_key("w1")) == len(records)
            # Listed by a few SADDs (at most one per pipeline), not one per create.
            assert await sadd_calls(counter) <= 4
        finally:
            await counter.aclose()
    finally:
        await store.close()


async def sadd_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_sadd", {}).get("calls", 0))
