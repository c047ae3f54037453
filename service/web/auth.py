"""Authentication of ``/v1`` and ``/admin``.

With ``QUIESCE_API_TOKEN`` set, a request needs ``Authorization: Bearer <token>``
(compared in constant time). Without it, only clients on loopback are served —
the preStop hook and a developer's curl work, nothing from the network does.
``/healthz``, ``/readyz`` and ``/metrics`` carry no guard.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler

from service.web.state import services_of

#: Handlers with this opt set count refused requests in quiesce_runs_rejected_total.
COUNTS_REJECTIONS = "counts_rejections"


async def require_auth(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    # Async on purpose: Litestar runs a sync guard in a worker thread, on every request.
    services = services_of(connection.app)
    token = services.settings.api_token
    if token is not None:
        ok = _bearer_matches(connection.headers.get("authorization"), token)
        detail = "a valid bearer token is required"
    else:
        client = connection.client
        ok = client is not None and _is_loopback(client.host)
        detail = "no QUIESCE_API_TOKEN is set, so only loopback clients are served"
    if not ok:
        if handler.opt.get(COUNTS_REJECTIONS):
            services.metrics.runs_rejected.labels("unauthorized").inc()
        raise NotAuthorizedException(detail=detail, headers={"WWW-Authenticate": "Bearer"})


def _bearer_matches(header: str | None, token: str) -> bool:
    if header is None:
        return False
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.encode())


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
