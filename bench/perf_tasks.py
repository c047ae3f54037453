"""Tasks the performance bench runs (``QUIESCE_TASK_MODULES=perf_tasks``, with
``bench/`` on ``PYTHONPATH``)."""

from __future__ import annotations

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
