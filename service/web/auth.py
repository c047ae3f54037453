"""Authentication of ``/v1`` and ``/admin``.

With ``QUIESCE_API_TOKEN`` set, a request needs ``Authorization: Bearer <token>``
(compared in constant time). Without it, only clients on loopback are served —
the preStop hook and a developer's curl work, nothing from the network does.
``/healthz``, ``/readyz`` and ``/metrics`` are outside these controllers and carry
no check.

It is a route middleware rather than a Litestar guard: a guard costs a copy of the
route handler on every request, and this check runs on every API request.
"""

from __future__ import annotations

import hmac
import ipaddress
from functools import lru_cache
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from service.web import rejections
from service.web.errors import send_error
from service.web.rejections import COUNTS_REJECTIONS
from service.web.state import services_of


def auth_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        services = services_of(scope["litestar_app"])
        token = services.settings.api_token
        if token is not None:
            if _bearer_matches(_header(scope, b"authorization"), token):
                await app(scope, receive, send)
                return
            detail = "a valid bearer token is required"
        else:
            client = scope.get("client")
            if client is not None and _is_loopback(client[0]):
                await app(scope, receive, send)
                return
            detail = "no QUIESCE_API_TOKEN is set, so only loopback clients are served"
        if scope["route_handler"].opt.get(COUNTS_REJECTIONS):
            rejections.count(services.metrics, "unauthorized")
        await _refuse(send, detail)

    return middleware


async def _refuse(send: Send, detail: str) -> None:
    """A 401 with the challenge RFC 6750 asks for."""
    await send_error(send, 401, detail, (b"www-authenticate", b"Bearer"))


def _header(scope: Any, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _bearer_matches(header: str | None, token: str) -> bool:
    if header is None:
        return False
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.encode())


@lru_cache(maxsize=1024)
def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
