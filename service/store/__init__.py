"""Run stores: the ``RunStore`` interface and its memory and Redis implementations."""

from __future__ import annotations

from collections.abc import Callable

from service.config import Settings
from service.store.base import CancelListener, CancelOutcome, EventWatch, RunStore
from service.store.memory import MemoryRunStore

__all__ = ["CancelListener", "CancelOutcome", "EventWatch", "RunStore", "open_store"]


def open_store(settings: Settings, *, on_error: Callable[[str], None] | None = None) -> RunStore:
    """The store the settings ask for: Redis when a URL is set, else the embedded one."""
    if settings.redis_url is None:
        return MemoryRunStore(retention_seconds=settings.run_retention_seconds)
    from service.store.redis import RedisRunStore
    from service.store.redis_connect import RedisConnector

    return RedisRunStore(
        settings.redis_url,
        retention_seconds=settings.run_retention_seconds,
        on_error=on_error,
        connector=RedisConnector.from_settings(settings),
        min_replicas=settings.redis_min_replicas,
        wait_timeout_seconds=settings.redis_wait_timeout_seconds,
        mode=settings.redis_mode,
    )
