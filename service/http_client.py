"""The shared HTTP client that tasks and callbacks use, cheap to create.

httpx builds its connection pool when the client is created: it imports httpcore
and loads the system's CA certificates into a TLS context, together about a tenth
of a worker's start. Neither is needed to become ready, so the client's transport —
exactly the one httpx would build, with the same options — is made on the first
request instead. With proxies set in the environment (``HTTPS_PROXY`` and the
like), which httpx would route through transports of their own, the client is
built as httpx builds it, with no change.
"""

from __future__ import annotations

import urllib.request
from typing import Any, Final

import httpx

#: Defaults of the shared client that tasks use; a task may pass its own timeout.
TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0)
LIMITS: Final = httpx.Limits(max_connections=200, max_keepalive_connections=50)


def new_client() -> httpx.AsyncClient:
    """The client (use it as an async context manager: leaving it closes the pool)."""
    if urllib.request.getproxies():  # what httpx reads for its proxy transports
        return httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS, follow_redirects=False)
    return httpx.AsyncClient(
        timeout=TIMEOUT, transport=_OnFirstUse(limits=LIMITS), follow_redirects=False
    )


class _OnFirstUse(httpx.AsyncBaseTransport):
    """``httpx.AsyncHTTPTransport(**options)``, built when the first request is sent."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._transport: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._transport is None:
            self._transport = httpx.AsyncHTTPTransport(**self._options)
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
