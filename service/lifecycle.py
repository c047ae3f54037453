"""The replica's lifecycle: ``starting → ready → draining → stopped``.

``starting → ready`` happens once, when the app has opened everything it needs.
``draining`` and ``stopped`` are the drain's (``service.runs.drain``): its one
entry point, :meth:`~service.runs.drain.Drain.begin`, is what every trigger calls.
"""

from __future__ import annotations

import structlog

from service.runs.drain import Drain
from service.scheduler import Scheduler
from service.schemas import LifecycleState

log = structlog.get_logger(__name__)


class Lifecycle:
    def __init__(self, scheduler: Scheduler) -> None:
        self._worker_id = scheduler.worker_id
        #: The replica's drain (one per process).
        self.drain: Drain = scheduler.drain
        self._ready = False

    @property
    def state(self) -> LifecycleState:
        if self.drain.stopped.is_set():
            return "stopped"
        if self.drain.draining.is_set():
            return "draining"
        return "ready" if self._ready else "starting"

    def mark_ready(self) -> None:
        if not self._ready:
            self._ready = True
            log.info("ready", worker_id=self._worker_id)
