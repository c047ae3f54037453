"""Prometheus metrics, in a registry owned by the app (never the global one).

One Granian worker per pod is the supported model, so the process's own registry
is the pod's truth and no multiprocess collector is needed. Label values are
bounded: task names come from the registry, statuses and reasons from fixed sets,
and HTTP routes are route templates (``/v1/runs/{run_id}``), never raw paths.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.schemas import FailureReason, RetryReason

REJECT_REASONS: Final = ("draining", "capacity", "invalid", "unauthorized", "store_unavailable")
CANCEL_REASONS: Final = ("user", "shutdown", "timeout")
FINISHED_STATUSES: Final = ("succeeded", "failed", "cancelled")
CALLBACK_OUTCOMES: Final = ("delivered", "failed")
POD_DELETION_COST_OUTCOMES: Final = ("updated", "failed")
#: Runs last from milliseconds to a day; the buckets span that range.
RUN_DURATION_BUCKETS: Final = (
    0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400,
)  # fmt: skip
HTTP_DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: The exposition type without its charset: Litestar appends one to every text/* type,
#: and a parameter given twice is an invalid media type (Prometheus 3 refuses it).
CONTENT_TYPE: Final = "; ".join(
    part.strip()
    for part in CONTENT_TYPE_LATEST.split(";")
    if not part.strip().startswith("charset")
)


class QueuedRuns(Collector):
    """``quiesce_queued_runs``: runs in the shared pending queue, waiting for a replica.

    The queue is one for the whole installation, so if every pod exported its length a
    ``sum`` across pods would count it once per pod. Only the replica that holds the
    store's reporter lease (``service.runs.adoption``) exports it; on every other pod
    the series is absent. A sum over pods is then the queue's length (and a lost
    reporter shows as a gap of at most a lease, not as a doubled value).
    """

    def __init__(self) -> None:
        self._value: int | None = None

    def report(self, value: int | None) -> None:
        """The length to export, or None on a replica that is not the reporter."""
        self._value = value

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self._value is None:
            return []
        family = GaugeMetricFamily(
            "quiesce_queued_runs",
            "Runs waiting in the shared pending queue for another attempt (exported by "
            "one replica only, so a sum across pods is the queue's length).",
        )
        family.add_metric([], self._value)
        return [family]

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


class Series:
    """A labelled metric's children, each looked up with ``labels()`` once.

    ``labels()`` validates its arguments and takes a lock on every call; the metrics
    touched by every request and every run have small, bounded label sets, so their
    children are kept here instead.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """Every metric of the contract (README, "Metrics"), plus HTTP request metrics."""

    def __init__(self, *, max_active_runs: int, task_names: Iterable[str] = ()) -> None:
        # ``_created`` series double the count and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active_runs = Gauge(
            "quiesce_active_runs", "Runs executing in this replica (the HPA signal).", registry=r
        )
        self.max_active_runs = Gauge(
            "quiesce_max_active_runs", "Admission limit of this replica.", registry=r
        )
        self.draining = Gauge("quiesce_draining", "1 while this replica drains.", registry=r)
        self.runs_started = Counter(
            "quiesce_runs_started_total", "Runs admitted and started.", ["task"], registry=r
        )
        self.runs_finished = Counter(
            "quiesce_runs_finished_total",
            "Runs that reached a terminal status here.",
            ["task", "status"],
            registry=r,
        )
        self.run_failures = Counter(
            "quiesce_run_failures_total", "Failed runs by reason.", ["task", "reason"], registry=r
        )
        self.run_cancellations = Counter(
            "quiesce_run_cancellations_total",
            "Runs whose task was cancelled, by why (user, shutdown, timeout).",
            ["task", "reason"],
            registry=r,
        )
        self.run_duration = Histogram(
            "quiesce_run_duration_seconds",
            "Wall time from admission to the terminal write.",
            ["task", "status"],
            buckets=RUN_DURATION_BUCKETS,
            registry=r,
        )
        self.runs_rejected = Counter(
            "quiesce_runs_rejected_total",
            "Create requests refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.store_errors = Counter(
            "quiesce_store_errors_total",
            "Store operations that failed because the store was unreachable.",
            ["operation"],
            registry=r,
        )
        self.store_resets = Counter(
            "quiesce_store_resets_total",
            "Times the store was found reset (its generation marker vanished or changed).",
            registry=r,
        )
        self.orphans_reaped = Counter(
            "quiesce_orphans_reaped_total",
            "Runs of lost workers finalized as worker_lost by this replica.",
            registry=r,
        )
        self.callbacks = Counter(
            "quiesce_callbacks_total", "Completion callbacks by outcome.", ["outcome"], registry=r
        )
        self.http_requests = Counter(
            "quiesce_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "quiesce_http_request_duration_seconds",
            "HTTP request latency by route template and method (streams: until the end).",
            ["method", "route"],
            buckets=HTTP_DURATION_BUCKETS,
            registry=r,
        )
        self.streams_active = Gauge(
            "quiesce_streams_active", "Event streams open in this replica.", registry=r
        )
        self.max_streams = Gauge(
            "quiesce_max_streams", "Event streams this replica keeps open at most.", registry=r
        )
        self.streams_rejected = Counter(
            "quiesce_streams_rejected_total",
            "Event stream requests refused with 503 because the replica had its maximum open.",
            registry=r,
        )
        self.request_body_timeouts = Counter(
            "quiesce_request_body_timeouts_total",
            "Requests answered 408 because their body did not arrive in time.",
            registry=r,
        )
        self.pod_deletion_cost_updates = Counter(
            "quiesce_pod_deletion_cost_updates_total",
            "Requests to the Kubernetes API for this pod's deletion-cost annotation, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.runs_requeued = Counter(
            "quiesce_runs_requeued_total",
            "Attempts that ended with a reason their retry policy lists: the run was queued "
            "for another attempt.",
            ["task", "reason"],
            registry=r,
        )
        self.runs_adopted = Counter(
            "quiesce_runs_adopted_total",
            "Queued runs this replica adopted for another attempt.",
            ["task"],
            registry=r,
        )
        # The series touched by every request and every run (see Series).
        self.http_requests_of = Series(self.http_requests)
        self.http_duration_of = Series(self.http_duration)
        self.runs_started_of = Series(self.runs_started)
        self.runs_finished_of = Series(self.runs_finished)
        self.run_duration_of = Series(self.run_duration)
        #: The pending queue's length, reported by one replica at a time (see QueuedRuns).
        self.queued_runs = QueuedRuns()
        r.register(self.queued_runs)

        self.max_active_runs.set(max_active_runs)
        # Series exist from the first scrape, so rate() and alerts see a zero, not a gap.
        for reason in REJECT_REASONS:
            self.runs_rejected.labels(reason)
        for outcome in CALLBACK_OUTCOMES:
            self.callbacks.labels(outcome)
        for outcome in POD_DELETION_COST_OUTCOMES:
            self.pod_deletion_cost_updates.labels(outcome)
        for task in task_names:
            self.runs_started.labels(task)
            for status in FINISHED_STATUSES:
                self.runs_finished.labels(task, status)
            for failure in get_args(FailureReason):
                if failure != "cancelled":
                    self.run_failures.labels(task, failure)
            for cancel in CANCEL_REASONS:
                self.run_cancellations.labels(task, cancel)
            self.runs_adopted.labels(task)
            for retry_reason in get_args(RetryReason):
                self.runs_requeued.labels(task, retry_reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
