"""The objects a request handler may use, built once per app in its lifespan."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from litestar import Litestar
from litestar.datastructures import State

from service.callbacks import CallbackSender
from service.config import Settings
from service.lifecycle import Lifecycle
from service.metrics import Metrics
from service.scheduler import Scheduler
from service.store import RunStore
from service.tasks import TaskRegistry
from service.web.fanout import EventFeeds
from service.webhooks import WebhookKey


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    metrics: Metrics
    registry: TaskRegistry
    store: RunStore
    http: httpx.AsyncClient
    scheduler: Scheduler
    lifecycle: Lifecycle
    callbacks: CallbackSender
    #: Verifies signed webhooks on create, when QUIESCE_WEBHOOK_SECRET is set.
    webhook_key: WebhookKey | None
    #: One feed per watched run, shared by every event stream of that run.
    feeds: EventFeeds


def services_of(app: Litestar) -> Services:
    services = app.state.get("services")
    if not isinstance(services, Services):
        raise RuntimeError("the app's lifespan has not started (use the app inside its lifespan)")
    return services


def provide_services(state: State) -> Services:
    """Dependency: ``services: Services`` in a handler's signature."""
    services = state.get("services")
    assert isinstance(services, Services)
    return services
