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
from litestar.openapi.datastructures import ResponseSpec
from msgspec import Struct

from service.errors import StoreUnavailable
from service.metrics import CONTENT_TYPE
from service.web.state import Services

#: Readiness must answer within a probe's default 1 s timeout.
STORE_PING_TIMEOUT_SECONDS: Final = 0.5


class Liveness(Struct, kw_only=True, frozen=True):
    status: str
    state: str


class Readiness(Struct, kw_only=True, frozen=True):
    """``ready``; or why not: ``starting``, ``draining``, ``stopped``, ``store_unavailable``."""

    status: str


_NOT_READY: Final = ResponseSpec(
    data_container=Readiness,
    generate_examples=False,
    description="Not ready: starting, draining, stopped or store_unavailable.",
)


@get(
    "/healthz",
    tags=["probes"],
    summary="Liveness",
    operation_id="healthz",
    responses={200: ResponseSpec(Liveness, generate_examples=False, description="Alive.")},
)
async def healthz(services: NamedDependency[Services]) -> dict[str, str]:
    return {"status": "ok", "state": services.lifecycle.state}


@get(
    "/readyz",
    tags=["probes"],
    summary="Readiness",
    operation_id="readyz",
    responses={
        200: ResponseSpec(Readiness, generate_examples=False, description="Ready."),
        503: _NOT_READY,
    },
)
async def readyz(services: NamedDependency[Services]) -> Response[dict[str, Any]]:
    state = services.lifecycle.state
    if state != "ready":
        return Response({"status": state}, status_code=503)
    try:
        await asyncio.wait_for(services.store.ping(), STORE_PING_TIMEOUT_SECONDS)
    except (StoreUnavailable, TimeoutError):
        return Response({"status": "store_unavailable"}, status_code=503)
    return Response({"status": "ready"}, status_code=200)


@get(
    "/metrics",
    tags=["probes"],
    summary="Prometheus metrics",
    operation_id="metrics",
    media_type=CONTENT_TYPE,
    responses={
        200: ResponseSpec(
            str,
            generate_examples=False,
            media_type=CONTENT_TYPE,
            description="The Prometheus text exposition format.",
        )
    },
)
async def metrics(services: NamedDependency[Services]) -> Response[bytes]:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
