"""The drain bridge's hold on Granian's worker stop event (the wiring itself is proven
with the real Granian process and real signals in tests/e2e, on both loops)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import granian._signals
import pytest

from service import granian_bridge


@pytest.fixture
def granian_signals() -> Iterator[None]:
    """Granian's own function to start with (an app built by an earlier test may have
    left the wrapper in place); Granian's module and the bridge left as they were."""
    original = granian._signals.set_loop_signals
    captured = granian_bridge._captured
    granian._signals.set_loop_signals = getattr(original, "__wrapped__", original)
    yield
    granian._signals.set_loop_signals = original
    granian_bridge._captured = captured


@pytest.mark.usefixtures("granian_signals")
async def test_prepare_keeps_the_stop_event_granian_creates_next() -> None:
    original = granian._signals.set_loop_signals
    granian_bridge.prepare()
    granian_bridge.prepare()  # a second factory call does not wrap twice
    wrapper = granian._signals.set_loop_signals
    assert wrapper is not original
    assert wrapper.__wrapped__ is original  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    try:
        event = granian._signals.set_loop_signals(loop)  # what Granian's worker calls
    finally:
        for sig in granian_bridge.SIGNALS:
            loop.remove_signal_handler(sig)
    assert granian_bridge._captured is not None
    assert granian_bridge._captured.event is event
    assert granian_bridge._captured.loop is loop
    # The wrapper removed itself: Granian is as it was.
    assert granian._signals.set_loop_signals is original


@pytest.mark.usefixtures("granian_signals")
async def test_under_quiesce_serve_a_missing_stop_event_refuses_to_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(granian_bridge.MAIN_PID_ENV, "1")
    granian_bridge._captured = None
    with pytest.raises(RuntimeError, match="refusing to serve without a drain"):
        granian_bridge.install(drain=None)  # type: ignore[arg-type]
