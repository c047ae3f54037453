"""The bridge between Granian's signal handling and the drain — the only module that
knows how Granian stops. Tested with granian 2.8.x (the range pinned in pyproject),
on the asyncio loop and on uvloop.

Why it exists. On SIGTERM/SIGINT a Granian worker closes its listener at once
(readiness would read "connection refused", not 503), then waits without limit for
every open connection (an SSE stream holds it forever), and only then runs the ASGI
lifespan shutdown. A drain started there is too late.

How a Granian worker stops. After it has loaded the app — it calls our factory —
the worker calls ``granian._signals.set_loop_signals(loop)``. That creates the
worker's stop event (a ``WorkerSignal``) and adds, with ``loop.add_signal_handler``,
SIGTERM/SIGINT handlers whose only work is to set it; setting it is what stops the
server. The bridge needs that event and nothing else, and reads no private state of
the loop, so it works on any event loop:

0. :func:`prepare`, called by the factory, wraps ``set_loop_signals`` (the worker
   looks the function up on its module when it calls it, after the factory), so
   the event it returns is kept; the wrapper removes itself after that one call.

1. At lifespan startup :func:`install` replaces the worker's SIGTERM/SIGINT handlers,
   through the loop's public ``add_signal_handler``, with one that only calls
   ``Drain.begin`` — the server keeps serving while the drain runs.
2. When the drain has finished, handlers that set Granian's event are put back (the
   same thing Granian's own handlers do) and the bridge sets the event: Granian
   stops as it always does, now with no run left and no stream open, and the
   process exits 0.
3. A drain started over HTTP (``POST /admin/drain`` — the preStop hook) leaves the
   server answering after it has finished, because in Kubernetes the kubelet sends
   SIGTERM only once the hook has returned; exiting earlier would kill the hook and
   record a failed preStop. That SIGTERM then takes path 2 at once. Without one
   (a drain asked for by hand, or a platform with no hook), the worker stops by
   itself at the drain's deadline — grace + 1.5 s after its start, and at least
   ``LINGER_SECONDS`` after it finished — by asking Granian's main process to
   stop (SIGTERM to the parent), so the exit is a clean 0, not "a worker died".

4. A worker whose main process has died (SIGKILLed, OOM-killed outside a container)
   is an orphan that would go on serving and renewing its lease forever: nothing
   would ever stop it, and its runs would never be reaped. The worker checks its
   parent every ``PARENT_POLL_SECONDS``; when Granian's main process is gone it
   drains through the same entry point with no grace (the runs still active are
   recorded ``failed``/``shutdown``; a drain already under way has what is left of
   its grace cut to nothing) and stops itself as in path 2, so it is gone
   within 2 s of the death. ``PR_SET_PDEATHSIG`` was not used: it is Linux-only, it
   fires when the *thread* that forked the worker ends rather than the process, and
   a signal would arrive as an ordinary SIGTERM with the full grace. A bound that
   does not depend on Granian's own stop (it waits for every open connection) ends
   the process at ``ORPHAN_EXIT_SECONDS`` after the death was noticed, whatever is
   still under way then; a run whose write had not completed is reaped by a peer
   once the lease expires, as after a crash.

``quiesce serve`` sets ``QUIESCE_GRANIAN_MAIN_PID``; if Granian's stop event was not
seen or the handlers cannot be taken over then, start-up fails rather than run
without a drain. Under a plain ``granian`` command the bridge is installed when it
can be, and an error is logged when it cannot.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

if TYPE_CHECKING:
    from service.runs.drain import Drain

log = structlog.get_logger(__name__)

#: Set by ``quiesce serve`` to the PID of Granian's main process.
MAIN_PID_ENV: Final = "QUIESCE_GRANIAN_MAIN_PID"
SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
#: After an HTTP-triggered drain: the least time left for ``quiesce drain`` to read
#: the result (it is sent the moment the drain ends) before the server stops.
LINGER_SECONDS: Final = 0.25
#: An HTTP-triggered drain stops the server by itself this long after the grace (the
#: drain's own writes may take up to 1.5 s of it; the exit must come by 2 s).
SELF_STOP_AFTER_GRACE_SECONDS: Final = 1.5
#: How often a worker checks that Granian's main process is still its parent.
PARENT_POLL_SECONDS: Final = 0.25
#: From noticing the main process's death to this process's exit, at the most: with
#: the poll interval, the worker is gone within 2 s of the death.
ORPHAN_EXIT_SECONDS: Final = 1.7
#: The drain of an orphan: runs still active are stopped at once.
ORPHAN_GRACE_SECONDS: Final = 0.0
#: The exit status of an orphan stopped by the bound (no parent reads it; a
#: supervisor that adopted the process may).
ORPHAN_FORCED_EXIT_CODE: Final = 1
#: The Granian module and function that set up a worker's stop signals.
GRANIAN_SIGNALS_MODULE: Final = "granian._signals"
GRANIAN_SET_LOOP_SIGNALS: Final = "set_loop_signals"


class StopEvent(Protocol):
    """Granian's ``WorkerSignal``: setting it stops the worker's server."""

    def set(self) -> None: ...


@dataclass(frozen=True)
class _Captured:
    loop: asyncio.AbstractEventLoop
    event: StopEvent


#: The stop event Granian made for this worker, and the loop it was made for.
_captured: _Captured | None = None


def prepare() -> None:
    """At factory time: keep the stop event Granian's worker creates next.

    Does nothing outside a process that has loaded Granian (tests, tools), and
    nothing the second time.
    """
    if "granian" not in sys.modules:
        return
    import importlib

    module = importlib.import_module(GRANIAN_SIGNALS_MODULE)
    original = getattr(module, GRANIAN_SET_LOOP_SIGNALS, None)
    if original is None or getattr(original, "_quiesce_capture", False):
        return
    setattr(module, GRANIAN_SET_LOOP_SIGNALS, _capturing(module, original))


def _capturing(module: Any, original: Callable[..., StopEvent]) -> Callable[..., StopEvent]:
    @functools.wraps(original)
    def set_loop_signals(loop: asyncio.AbstractEventLoop, *args: Any, **kwargs: Any) -> StopEvent:
        global _captured
        event = original(loop, *args, **kwargs)
        _captured = _Captured(loop, event)
        # One worker makes one stop event: Granian is left as it was.
        setattr(module, GRANIAN_SET_LOOP_SIGNALS, original)
        return event

    set_loop_signals._quiesce_capture = True  # type: ignore[attr-defined]
    return set_loop_signals


def install(drain: Drain) -> bool:
    """Take over the worker's signal handlers; False when not running under Granian."""
    loop = asyncio.get_running_loop()
    captured = _captured
    if captured is not None and captured.loop is loop:
        main_pid = int(os.environ.get(MAIN_PID_ENV) or os.getppid())
        bridge = _Bridge(loop, drain, captured.event, main_pid)
        for sig in SIGNALS:
            loop.add_signal_handler(sig, bridge.on_signal, sig)
        drain.on_stopped(bridge.on_drained)
        bridge.watch_parent()
        log.info("granian_bridge_installed", main_pid=main_pid, loop=_loop_name(loop))
        return True
    if MAIN_PID_ENV in os.environ:
        raise RuntimeError(
            "Granian's worker stop event was not seen (was the app loaded with --factory, "
            "by a supported Granian version?); refusing to serve without a drain"
        )
    if "granian" in sys.modules:
        log.error(
            "granian_bridge_unavailable",
            detail="start the service with `quiesce serve`: without it a drain starts only "
            "after Granian has closed its listener and every connection",
        )
    return False


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return type(loop).__module__.split(".")[0]


class _Bridge:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        drain: Drain,
        stop_event: StopEvent,
        main_pid: int,
    ) -> None:
        self._loop = loop
        self._drain = drain
        self._stop_event = stop_event
        self._main_pid = main_pid
        self._signalled = False
        self._handed_back = False
        self._watch: asyncio.Task[None] | None = None

    def watch_parent(self) -> None:
        self._watch = self._loop.create_task(self._watch_parent(), name="quiesce-parent-watch")

    async def _watch_parent(self) -> None:
        # Polling is the mechanism: one getppid() per tick is portable and meets the
        # 2 s bound (a Linux pidfd could report the death as an event, at the price
        # of a second code path for other systems).
        while os.getppid() == self._main_pid:  # noqa: ASYNC110
            await asyncio.sleep(PARENT_POLL_SECONDS)
        self.on_orphaned()

    def on_orphaned(self) -> None:
        """Granian's main process is gone: drain at once, then stop this process."""
        log.error(
            "granian_main_process_gone",
            main_pid=self._main_pid,
            detail=f"draining without grace; this worker exits within {ORPHAN_EXIT_SECONDS}s",
        )
        timer = threading.Timer(ORPHAN_EXIT_SECONDS, _exit_orphan)
        timer.daemon = True  # never keeps a finished process alive
        timer.start()
        self._signalled = True  # the drain's end stops the server at once (path 2)
        if self._drain.stopped.is_set():
            self._hand_back()
            return
        # (a drain already under way keeps going, with what is left of its grace cut)
        self._drain.begin("parent_exited", grace_seconds=ORPHAN_GRACE_SECONDS)

    def on_signal(self, sig: int) -> None:
        self._signalled = True
        if self._drain.stopped.is_set():
            self._hand_back()  # drained already (over HTTP): stop now
            return
        self._drain.begin(signal.Signals(sig).name)

    def on_drained(self) -> None:
        if self._signalled:
            self._hand_back()
            return
        cancel_at = self._drain.cancel_at or self._loop.time()
        deadline = cancel_at + SELF_STOP_AFTER_GRACE_SECONDS
        stop_at = max(self._loop.time() + LINGER_SECONDS, deadline)
        self._loop.call_at(stop_at, self._stop_main)

    def _stop_main(self) -> None:
        if self._handed_back:
            return
        if os.getppid() != self._main_pid:
            # Not Granian's worker after all (or orphaned): stop this process directly.
            self._hand_back()
            return
        log.info("stopping_server", via="main_process")
        os.kill(self._main_pid, signal.SIGTERM)  # it forwards SIGTERM here → on_signal

    def _hand_back(self) -> None:
        if self._handed_back:
            return
        self._handed_back = True
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        # From here on a signal does what Granian's own handler does: set the event.
        for sig in SIGNALS:
            self._loop.add_signal_handler(sig, self._stop_event.set)
        log.info("stopping_server", via="worker_signal")
        self._stop_event.set()


def _exit_orphan() -> None:
    """The orphan's bound (on a timer thread): whatever is still under way, stop now."""
    log.error("orphan_exit_forced", after_seconds=ORPHAN_EXIT_SECONDS)
    sys.stderr.flush()
    os._exit(ORPHAN_FORCED_EXIT_CODE)
