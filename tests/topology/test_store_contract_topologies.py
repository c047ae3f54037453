"""The store contract suite, again, over Sentinel, mutual TLS, and Sentinel over TLS.

The tests are those of tests/integration/test_store_contract.py; the fixtures below
(which override tests/conftest.py's for this module only) give them stores opened
from settings exactly as the service opens them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service.store import RunStore
from tests.integration import test_store_contract as contract
from tests.topology.conftest import build_store

pytestmark = pytest.mark.topology


@pytest.fixture(params=["sentinel", "tls", "tls-sentinel"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def new_store(store_kind: str, request: pytest.FixtureRequest) -> Callable[[], RunStore]:
    return lambda: build_store(store_kind, request)


# Every contract test, over these topologies.
globals().update(
    {name: value for name, value in vars(contract).items() if name.startswith("test_")}
)
