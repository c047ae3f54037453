"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.config import Settings
from tests.integration.api_support import app_client
from tests.integration.support import Client


@pytest.fixture
async def memory_client(settings: Settings) -> AsyncIterator[Client]:
    """For what does not depend on the store (request validation, routing, auth)."""
    async with app_client(settings) as client:
        yield client
