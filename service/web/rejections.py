"""``quiesce_runs_rejected_total``: every refused create is counted here, and only here.

A create can be refused before its handler runs (auth middleware: ``unauthorized``;
the body checks: ``invalid``, or ``unauthorized`` for a bad webhook signature) or by
the core (draining, capacity, store, an unknown task, a reused idempotency key). Each
of those places calls :func:`count` with a reason, or :func:`count_error` with the
core's error, so the reasons and their mapping live in one module.
"""

from __future__ import annotations

from typing import Final, Literal

from service.errors import (
    AtCapacity,
    Draining,
    IdempotencyMismatch,
    InvalidInput,
    QuiesceError,
    StoreUnavailable,
    UnknownTask,
)
from service.metrics import Metrics

RejectionReason = Literal["draining", "capacity", "invalid", "unauthorized", "store_unavailable"]

#: Route handlers with this opt set have their refused requests counted (the create).
COUNTS_REJECTIONS: Final = "counts_rejections"

#: Which reason each refusal of the core counts under (others are not rejections).
_REASONS: Final[tuple[tuple[type[QuiesceError], RejectionReason], ...]] = (
    (Draining, "draining"),
    (AtCapacity, "capacity"),
    (StoreUnavailable, "store_unavailable"),
    (InvalidInput, "invalid"),
    (UnknownTask, "invalid"),
    (IdempotencyMismatch, "invalid"),
)


def count(metrics: Metrics, reason: RejectionReason) -> None:
    metrics.runs_rejected.labels(reason).inc()


def count_error(metrics: Metrics, exc: QuiesceError) -> None:
    """Count a create the core refused with ``exc``, if it is a rejection."""
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            count(metrics, reason)
            return
