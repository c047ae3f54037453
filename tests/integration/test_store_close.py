"""Closing the Redis store always ends, even when a listener missed its cancellation.

redis-py's timed Pub/Sub read can lose a cancellation that lands inside it (seen on
Python 3.11): a listener that only relied on ``task.cancel()`` then read on forever,
and ``close()`` — the last step of every shutdown — never returned.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.client import PubSub

from service.store.redis import RedisRunStore
from tests.conftest import RedisServer

#: A failure condition only: a close that hangs fails the test instead of the run.
CLOSE_WITHIN_SECONDS = 10.0


async def test_close_ends_when_every_listener_swallows_a_cancellation(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    swallowed: set[int] = set()  # the PubSub objects that lost one cancellation
    get_message = PubSub.get_message

    async def loses_one_cancellation(self: PubSub, *args: Any, **kwargs: Any) -> Any:
        try:
            return await get_message(self, *args, **kwargs)
        except asyncio.CancelledError:
            if id(self) in swallowed:
                raise
            swallowed.add(id(self))  # the race: the read returns as if it timed out
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return None

    monkeypatch.setattr(PubSub, "get_message", loses_one_cancellation)
    store = RedisRunStore(redis_server.url, retention_seconds=60)
    await store.start()
    await asyncio.sleep(0.3)  # the listeners are reading
    closing = asyncio.create_task(store.close())
    _, pending = await asyncio.wait({closing}, timeout=CLOSE_WITHIN_SECONDS)
    assert not pending, "close() did not return"
    assert swallowed, "no listener read was cancelled: the test did not exercise the race"
