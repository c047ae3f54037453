"""Probes and metrics: never authenticated, cheap, and honest during a drain.

Liveness says only "the process answers" — it stays 200 while draining and while
the store is down, because a restart fixes neither. Readiness says "send me new
runs": 503 while starting, draining or stopped, and while the store is unreachable.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from litestar import Response, get
from litestar.di import NamedDependency

from service.errors import StoreUnavailable
from service.metrics import CONTENT_TYPE
from service.web.state import Services

#: Readiness must answer within a probe's default 1 s timeout.
STORE_PING_TIMEOUT_SECONDS: Final = 0.5


@get("/healthz", tags=["probes"], summary="Liveness")
async def healthz(services: NamedDependency[Services]) -> dict[str, str]:
    return {"status": "ok", "state": services.lifecycle.state}


@get("/readyz", tags=["probes"], summary="Readiness")
async def readyz(services: NamedDependency[Services]) -> Response[dict[str, Any]]:
    state = services.lifecycle.state
    if state != "ready":
        return Response({"status": state}, status_code=503)
    try:
        await asyncio.wait_for(services.store.ping(), STORE_PING_TIMEOUT_SECONDS)
    except (StoreUnavailable, TimeoutError):
        return Response({"status": "store_unavailable"}, status_code=503)
    return Response({"status": "ready"}, status_code=200)


@get("/metrics", tags=["probes"], summary="Prometheus metrics")
async def metrics(services: NamedDependency[Services]) -> Response[bytes]:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
