"""``sleep``: waits, in equal steps, reporting each. For demos and drain tests."""

from __future__ import annotations

import asyncio
from typing import Annotated

from msgspec import Meta, Struct

from service.store.base import MAX_EVENTS_PER_RUN
from service.tasks.base import RunContext, task


class SleepInput(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    seconds: Annotated[float, Meta(ge=0, le=86400)]
    #: At most as many steps as a run keeps events, so no progress is trimmed away.
    steps: Annotated[int, Meta(ge=1, le=MAX_EVENTS_PER_RUN - 2)] = 1


@task("sleep")
async def sleep(ctx: RunContext, params: SleepInput) -> dict[str, float]:
    """Sleep ``seconds`` in ``steps`` equal parts; emit ``{"step": i, "of": steps}`` after each."""
    for step in range(1, params.steps + 1):
        await asyncio.sleep(params.seconds / params.steps)
        await ctx.emit({"step": step, "of": params.steps})
    return {"slept": params.seconds}
