"""Tasks the performance bench runs (``QUIESCE_TASK_MODULES=perf_tasks``, with
``bench/`` on ``PYTHONPATH``)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from msgspec import Meta, Struct

from service.tasks import RunContext, task


class EmitInput(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    events: Annotated[int, Meta(ge=0, le=10_000_000)]


@task("perf_emit")
async def perf_emit(ctx: RunContext, params: EmitInput) -> dict[str, int]:
    """Emit ``{"i": 1}``, ``{"i": 2}``, … ``{"i": events}`` as fast as ``emit`` takes them."""
    for i in range(1, params.events + 1):
        await ctx.emit({"i": i})
    return {"emitted": params.events}


class TickInput(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    #: Events per second.
    rate: Annotated[float, Meta(gt=0, le=10_000)]
    #: How many events.
    ticks: Annotated[int, Meta(ge=0, le=1_000_000)]
    #: When the first is due (Unix time; 0 or the past: at once).
    start_at: float = 0.0


@task("tick")
async def tick(ctx: RunContext, params: TickInput) -> dict[str, int]:
    """Emit ``{"i": i, "t": <Unix time of the emit>}`` ``ticks`` times at ``rate``
    per second, on a fixed schedule from ``start_at`` (a late tick does not shift the
    next ones). Watchers measure emit-to-receipt latency from ``t``."""
    start = max(params.start_at, time.time())
    for i in range(params.ticks):
        delay = start + i / params.rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await ctx.emit({"i": i, "t": time.time()})
    return {"ticks": params.ticks}
