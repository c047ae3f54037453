"""``/admin``: start the drain (what the preStop hook calls) and read the replica's state."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from service.schemas import ActiveRunInfo, DrainInfo, ReplicaState
from service.web.auth import auth_middleware
from service.web.openapi import SECURITY, error_responses
from service.web.state import Services


def replica_state(services: Services) -> ReplicaState:
    scheduler = services.scheduler
    lifecycle = services.lifecycle
    active = scheduler.active_runs()
    drain = None
    progress = scheduler.drain.progress
    if progress is not None:
        drain = DrainInfo(
            trigger=scheduler.drain.trigger,
            started_at=progress.started_at,
            grace_seconds=progress.grace_seconds,
            cancel_at=progress.started_at + timedelta(seconds=progress.grace_seconds),
            active_at_start=progress.active_at_start,
            active_now=len(active),
            cancelled=progress.cancelled,
            finished=progress.finished,
            left_running=len(scheduler.drain.left_running),
        )
    return ReplicaState(
        state=lifecycle.state,
        worker_id=scheduler.worker_id,
        active_runs=[
            ActiveRunInfo(run_id=record.run_id, task=record.task, age_seconds=round(age, 3))
            for record, age in active
        ],
        active_count=len(active),
        max_active_runs=scheduler.max_active_runs,
        drain=drain,
    )


class AdminController(Controller):
    path = "/admin"
    tags = ("admin",)
    middleware = (auth_middleware,)
    security = SECURITY

    @post(
        "/drain",
        status_code=202,
        summary="Start the drain (idempotent)",
        operation_id="drain",
        responses=error_responses((400, 401)),
    )
    async def drain(
        self,
        services: NamedDependency[Services],
        wait: Annotated[
            float,
            QueryParameter(
                ge=0,
                le=3600,
                description="Answer when the drain has finished, or after this many seconds.",
            ),
        ] = 0,
    ) -> ReplicaState:
        services.scheduler.drain.begin("admin")
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(services.scheduler.drain.stopped.wait(), wait)
        return replica_state(services)

    @get(
        "/state",
        summary="This replica's state, active runs and drain progress",
        operation_id="replicaState",
        responses=error_responses((401,)),
    )
    async def state(self, services: NamedDependency[Services]) -> ReplicaState:
        return replica_state(services)
