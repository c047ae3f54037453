"""``echo``: a task whose progress and output are whatever its caller sent.

Loaded by the browser tests through ``QUIESCE_TASK_MODULES`` to put attacker-chosen
text into a run's events and output, the way a real task's data would get there.
"""

from __future__ import annotations

from msgspec import Struct

from service.tasks.base import RunContext, task


class EchoInput(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    text: str


@task("echo")
async def echo(ctx: RunContext, params: EchoInput) -> dict[str, str]:
    """Emit ``{"text": text}`` once and return it."""
    await ctx.emit({"text": params.text})
    return {"text": params.text}
