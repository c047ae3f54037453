"""The app factory: ``create_app()`` builds the Litestar app; nothing happens at import.

Granian calls it (``--factory``) in its worker process. Configuration, logging, the
task registry and the metrics are built here, so a bad setting or task module stops
the process before it listens. The store, the HTTP client, the scheduler, the
lifecycle and the reaper live in the lifespan, which opens them before the first
request and, on the way out, drains (if no drain ran yet), gives up the lease and
then closes the store — every write has completed by then.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import structlog
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from service import __version__, granian_bridge, http_client
from service.callbacks import CallbackSender
from service.config import Settings
from service.egress import EgressPolicy
from service.errors import QuiesceError
from service.lifecycle import Lifecycle
from service.logging import Redactor, configure_logging
from service.metrics import Metrics
from service.pod_deletion_cost import PodDeletionCost
from service.reaper import Reaper
from service.runs.drain import Drain
from service.scheduler import Scheduler
from service.schemas import RunRecord
from service.store import open_store
from service.tasks.base import RunContexts
from service.tasks.loader import build_registry
from service.web import openapi
from service.web.admin import AdminController
from service.web.console import console_router
from service.web.errors import after_exception, handle_quiesce_error
from service.web.fanout import EventFeeds
from service.web.http_metrics import http_metrics_middleware
from service.web.limits import connection_limits
from service.web.probes import healthz, metrics, readyz
from service.web.recent_runs import STATE_KEY, RecentRuns, RecentRunsController
from service.web.runs import RunsController
from service.web.state import Services, provide_services
from service.webhooks import WebhookKey

log = structlog.get_logger(__name__)

#: Create bodies are small JSON documents; anything larger is refused with 413.
MAX_REQUEST_BODY_BYTES: Final = 1024 * 1024
#: Pending callbacks may use the drain's time up to this long after the grace (the
#: process must be gone 2 s after it), and at least the minimum.
CALLBACK_BUDGET_AFTER_GRACE_SECONDS: Final = 1.6
MIN_CALLBACK_BUDGET_SECONDS: Final = 0.1


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the app from ``settings`` (default: read from the environment)."""
    if settings is None:
        settings = Settings.from_env(os.environ)
    # In Granian's worker: keep the stop event it creates once this factory returns.
    granian_bridge.prepare()
    configure_logging(settings.log_format, redactor=Redactor.for_settings(settings))
    egress = EgressPolicy(settings.http_allowed_hosts)
    registry = build_registry(settings, egress)
    webhook_key = WebhookKey.optional(settings.webhook_secret)
    callback_key = WebhookKey.optional(settings.callback_secret)
    app_metrics = Metrics(
        max_active_runs=settings.max_active_runs, task_names=[t.name for t in registry]
    )
    recent_runs = RecentRuns()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        store = open_store(
            settings, on_error=lambda operation: app_metrics.store_errors.labels(operation).inc()
        )
        async with http_client.new_client() as http:
            callbacks = CallbackSender(
                http=http, policy=egress, key=callback_key, metrics=app_metrics
            )
            scheduler = Scheduler(
                store=store,
                registry=registry,
                metrics=app_metrics,
                contexts=RunContexts(http),
                worker_id=settings.worker_id,
                max_active_runs=settings.max_active_runs,
                default_timeout_seconds=settings.run_timeout_seconds,
                grace_seconds=settings.shutdown_grace_seconds,
                handoff_on_drain=settings.handoff_on_drain,
                on_finished=lambda record: _finished(record, recent_runs, callbacks),
            )
            lifecycle = Lifecycle(scheduler)
            store.on_reset(
                running=lambda: [record for record, _ in scheduler.active_runs()],
                reset=app_metrics.store_resets.inc,
            )
            await store.start()
            reaper = Reaper(
                store=store,
                metrics=app_metrics,
                worker_id=settings.worker_id,
                lease_ttl_seconds=settings.lease_ttl_seconds,
                finisher=scheduler.finisher,
            )
            await reaper.start()
            pod_cost = None
            if settings.pod_deletion_cost is not None:
                pod_cost = PodDeletionCost(
                    settings.pod_deletion_cost,
                    active_count=lambda: len(scheduler.active_runs()),
                    draining=scheduler.drain.draining.is_set,
                    metrics=app_metrics,
                )
                await pod_cost.start()
            app.state.services = Services(
                settings=settings,
                metrics=app_metrics,
                registry=registry,
                store=store,
                http=http,
                scheduler=scheduler,
                lifecycle=lifecycle,
                callbacks=callbacks,
                webhook_key=webhook_key,
                feeds=EventFeeds(store),
            )
            granian_bridge.install(scheduler.drain)
            _log_startup(settings, [t.name for t in registry])
            # Everything built so far lives as long as the process: keep it out of the
            # garbage collector's scans (a few percent of a busy worker's time).
            gc.freeze()
            # `quiesce serve` keeps the collector off through start-up (see cli.serve).
            gc.enable()
            lifecycle.mark_ready()
            scheduler.adopter.start()
            try:
                yield
            finally:
                # The server is stopping without a drain (e.g. not under Granian):
                # drain now, so no run is left running and every write is done.
                # (begin is idempotent: after a drain it changes nothing)
                scheduler.drain.begin("server_shutdown")
                await scheduler.drain.wait()
                await scheduler.adopter.stop()
                if pod_cost is not None:
                    await pod_cost.stop()
                await callbacks.close(within=_callback_budget(scheduler.drain))
                # Every run finalized: give the lease up; else let it expire, and a
                # peer reaps what this process could not write.
                await reaper.stop(retire=not scheduler.drain.left_running)
                await store.close()
                log.info("stopped")

    app = Litestar(
        route_handlers=[
            RunsController,
            AdminController,
            RecentRunsController,
            console_router,
            healthz,
            readyz,
            metrics,
        ],
        lifespan=[lifespan],
        state=State({"settings": settings, STATE_KEY: recent_runs}),
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        exception_handlers={QuiesceError: handle_quiesce_error},
        after_exception=[after_exception],
        middleware=[
            http_metrics_middleware,
            connection_limits(
                max_streams=settings.max_streams,
                body_timeout_seconds=settings.request_body_timeout_seconds,
                metrics=app_metrics,
            ),
        ],
        request_max_body_size=MAX_REQUEST_BODY_BYTES,
        logging_config=None,
        openapi_config=OpenAPIConfig(
            title="Quiesce",
            version=__version__,
            description="Runs created by webhook, executed in-process, drained on shutdown.",
            path="/schema",
            components=openapi.COMPONENTS,
        ),
    )
    openapi.complete(app.openapi_schema, registry)
    return app


def _finished(record: RunRecord, recent_runs: RecentRuns, callbacks: CallbackSender) -> None:
    """A run this replica finished: list it for the console, then send its callback."""
    recent_runs.finished(record)
    callbacks.send(record)


def _callback_budget(drain: Drain) -> float:
    """What is left, after a drain, for pending callbacks: up to the drain's deadline."""
    loop = asyncio.get_running_loop()
    deadline = (drain.cancel_at or loop.time()) + CALLBACK_BUDGET_AFTER_GRACE_SECONDS
    return max(deadline - loop.time(), MIN_CALLBACK_BUDGET_SECONDS)


def _log_startup(settings: Settings, tasks: list[str]) -> None:
    log.info(
        "starting",
        version=__version__,
        worker_id=settings.worker_id,
        store="redis" if settings.redis_url else "memory",
        tasks=tasks,
        max_active_runs=settings.max_active_runs,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
    )
    if settings.api_token is None:
        log.warning(
            "auth_loopback_only",
            detail="QUIESCE_API_TOKEN is not set: /v1 and /admin answer loopback clients only",
        )
    if settings.redis_url is None:
        log.warning(
            "memory_store",
            detail="QUIESCE_REDIS_URL is not set: runs live in this process only",
        )
