"""HTTP request metrics labelled by route template, never by raw path.

A route middleware times matched routes (its ``send`` sees the status after
Litestar's exception handling); requests that match no route (404/405) never reach
route middleware, so the app's after_exception hook counts those as ``unmatched``.
Either way a label value comes from a bounded set.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

from litestar.enums import ScopeType
from litestar.exceptions import MethodNotAllowedException, NotFoundException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.web.state import services_of

UNMATCHED = "unmatched"


def http_metrics_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        metrics = services_of(scope["litestar_app"]).metrics
        started = perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, timed_send)
        finally:
            method: str = scope["method"]
            route = str(scope.get("path_template", UNMATCHED))
            metrics.http_requests_of(method, route, str(status)).inc()
            metrics.http_duration_of(method, route).observe(perf_counter() - started)

    return middleware


def count_unmatched(exc: Exception, scope: Any) -> None:
    """Part of the after_exception hook: a request that matched no route (404/405)."""
    if (
        isinstance(exc, NotFoundException | MethodNotAllowedException)
        and "path_template" not in scope
    ):
        app: Any = scope.get("litestar_app")
        services = app.state.get("services") if app is not None else None
        if services is not None:
            status = str(exc.status_code)
            services.metrics.http_requests.labels(scope["method"], UNMATCHED, status).inc()
