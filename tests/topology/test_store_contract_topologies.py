"""The store contract suite, again, over Sentinel, mutual TLS, and Sentinel over TLS.

The tests are those of tests/integration/test_store_contract.py; the fixtures below
(which override tests/conftest.py's for this module only) give them a ``store`` opened
from settings exactly as the service opens it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.store import CancelOutcome, RunStore
from tests.integration import test_store_contract as contract
from tests.integration.test_store_contract import Listener, created
from tests.topology.conftest import build_store

pytestmark = pytest.mark.topology


@pytest.fixture(params=["sentinel", "tls", "tls-sentinel"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def store(store_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[RunStore]:
    instance = build_store(store_kind, request)
    await instance.start()
    yield instance
    await instance.close()


# Every contract test but the two-replica one, which needs two stores of a topology.
globals().update(
    {
        name: value
        for name, value in vars(contract).items()
        if name.startswith("test_")
        and name != "test_cancel_request_reaches_the_owners_listener_only"
    }
)


async def test_cancel_request_reaches_the_owners_listener_only(
    store_kind: str, request: pytest.FixtureRequest
) -> None:
    owner_store = build_store(store_kind, request)
    other_store = build_store(store_kind, request)
    owner, other = Listener(), Listener()
    owner_store.listen_for_cancels("worker-a", owner)
    other_store.listen_for_cancels("worker-b", other)
    try:
        await owner_store.start()
        await other_store.start()
        await asyncio.sleep(0.2)  # both subscribed
        record = await created(owner_store, worker_id="worker-a")
        assert await other_store.request_cancel(record.run_id) is CancelOutcome.REQUESTED
        await asyncio.wait_for(owner.notified.wait(), 2.0)
        assert owner.cancelled == [record.run_id]
        await asyncio.sleep(0.1)
        assert other.cancelled == []
    finally:
        await owner_store.close()
        await other_store.close()
