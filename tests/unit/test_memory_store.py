"""What only the embedded store has to do itself: forget runs after the retention."""

from __future__ import annotations

import asyncio

from service.store.memory import MemoryRunStore
from tests.integration.test_store_contract import created, terminal


async def test_finished_runs_are_forgotten_after_the_retention_running_ones_are_not() -> None:
    store = MemoryRunStore(retention_seconds=0.05)
    finished = await created(store)
    running = await created(store)  # its own timeout (60 s) keeps it
    await store.finalize(terminal(finished, "succeeded"))
    await asyncio.sleep(0.1)
    await created(store)  # creates sweep what has expired
    assert await store.get(finished.run_id) is None
    assert finished.run_id not in store._runs  # swept, not merely hidden
    assert (await store.get(running.run_id)) == running
