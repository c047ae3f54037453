"""The service's error hierarchy.

The core (scheduler, store, tasks) raises these and knows nothing about HTTP;
``service.web.errors`` is the one place that maps them to status codes.
"""

from __future__ import annotations

from typing import Any


class QuiesceError(Exception):
    """Base of every error the service raises on purpose."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class InvalidInput(QuiesceError):
    """A request is well-formed JSON but its content is not acceptable (400)."""


class InvalidCursor(QuiesceError):
    """The store cannot read an event cursor: it is not the id of an event (400).

    The store does not know where the cursor came from; the web layer says which
    parameter carried it (``after`` unless told otherwise).
    """


class UnknownTask(QuiesceError):
    """The create request names a task that is not registered (422)."""


class RunNotFound(QuiesceError):
    """No run with that id exists, or it has expired (404)."""


class RunAlreadyFinished(QuiesceError):
    """A cancel arrived for a run that already reached another terminal state (409)."""


class IdempotencyInProgress(QuiesceError):
    """The same idempotency key is still being admitted by another request (409)."""


class IdempotencyMismatch(QuiesceError):
    """The idempotency key was used before with a different body (422)."""


class Unavailable(QuiesceError):
    """The replica cannot take the request now; the client should retry (503/429)."""

    retry_after: int = 1


class Draining(Unavailable):
    """The replica is draining and admits no new runs (503)."""

    retry_after = 5


class AtCapacity(Unavailable):
    """The replica already runs ``QUIESCE_MAX_ACTIVE_RUNS`` runs (429)."""

    retry_after = 2


class StoreUnavailable(Unavailable):
    """The store did not answer in time (503)."""

    retry_after = 2
