"""``GET /admin/runs``: the runs this replica holds now and the last ones it finished.

There is no list API over the store (a scan over every run of every replica would be
slow and unbounded). The console only needs what an operator of one pod asks: what
runs here, and what just ended here. So the replica keeps a small bounded list of
the runs whose terminal write it won (fed by the scheduler's ``on_finished`` hook,
wired in the app factory) and adds its active runs when the list is read. It lives
in memory: a restarted pod starts with an empty list, which is what "recent on this
replica" means.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Final

from litestar import Controller, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from msgspec import Struct

from service.schemas import FailureReason, RunRecord, RunStatus
from service.web.auth import auth_middleware
from service.web.openapi import SECURITY, error_responses
from service.web.state import Services

#: How many finished runs a replica remembers.
RECENT_RUNS_LIMIT: Final = 100
#: Where the app keeps its list (``app.state``).
STATE_KEY: Final = "recent_runs"


class RunSummary(Struct, kw_only=True, frozen=True):
    """One line of the list: enough to find the run; ``GET /v1/runs/{run_id}`` has the rest."""

    run_id: str
    task: str
    status: RunStatus
    created_at: datetime
    finished_at: datetime | None = None
    reason: FailureReason | None = None

    @classmethod
    def of(cls, record: RunRecord) -> RunSummary:
        return cls(
            run_id=record.run_id,
            task=record.task,
            status=record.status,
            created_at=record.created_at,
            finished_at=record.finished_at,
            reason=None if record.error is None else record.error.reason,
        )


class RunList(Struct, kw_only=True, frozen=True):
    """Body of ``GET /admin/runs``."""

    #: This replica's active runs, oldest first.
    active: list[RunSummary]
    #: The last runs this replica finished (at most ``limit``), newest first.
    finished: list[RunSummary]
    limit: int


class RecentRuns:
    """A bounded, newest-last list of finished runs (one per run id)."""

    def __init__(self, limit: int = RECENT_RUNS_LIMIT) -> None:
        self._runs: deque[RunSummary] = deque(maxlen=limit)
        self.limit = limit

    def finished(self, record: RunRecord) -> None:
        """The scheduler's ``on_finished`` hook: called once per run whose end it wrote."""
        self._runs.append(RunSummary.of(record))

    def newest_first(self) -> list[RunSummary]:
        return list(reversed(self._runs))


class RecentRunsController(Controller):
    path = "/admin"
    tags = ("admin",)
    middleware = (auth_middleware,)
    security = SECURITY

    @get(
        "/runs",
        summary="This replica's active runs and the last runs it finished",
        description=f"Kept in this replica's memory (the last {RECENT_RUNS_LIMIT} finished "
        "runs); another replica lists its own. Read a run with `GET /v1/runs/{run_id}`.",
        operation_id="recentRuns",
        responses=error_responses((401,)),
    )
    async def recent_runs(self, state: State, services: NamedDependency[Services]) -> RunList:
        recent: RecentRuns = state[STATE_KEY]
        return RunList(
            active=[RunSummary.of(record) for record, _ in services.scheduler.active_runs()],
            finished=recent.newest_first(),
            limit=recent.limit,
        )
