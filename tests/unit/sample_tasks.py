"""A user task module for tests/unit/test_task_loading.py (QUIESCE_TASK_MODULES)."""

from __future__ import annotations

import msgspec

from service.tasks import RunContext, task


class EchoInput(msgspec.Struct, forbid_unknown_fields=True):
    text: str


@task("sample_echo")
async def sample_echo(ctx: RunContext, params: EchoInput) -> dict[str, str]:
    """Return the text it was given."""
    await ctx.emit({"echoing": params.text})
    return {"echo": params.text}
