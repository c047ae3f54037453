"""Busy-aware scale-in: the pod's deletion cost follows its active runs.

When a ReplicaSet scales down (the HPA lowered the Deployment's replicas), it deletes
first the pods whose ``controller.kubernetes.io/pod-deletion-cost`` annotation is
lowest (after unscheduled, not-running and not-ready pods). Kubernetes does not know
which replica is busy; this module tells it, with the active run count as the cost:
an idle pod (0, the same as no annotation) goes first, and among busy ones the pod
with the fewest runs, so a scale-in interrupts (drains) as little work as possible.

It is best effort, and cheap for the API server: a JSON merge patch on the pod's own
object, only when the count changed, at most once per interval. A failure (RBAC
missing, API server unavailable) is logged and counted, retried with backoff, and
never stops the service: the worst case is Kubernetes' default choice.

Once the pod drains, updating stops: a draining pod is not ready (the ReplicaSet
deletes such pods first whatever their cost) and is usually already being deleted.

The API is reached with a client of its own, not the shared one that tasks use: it
trusts the cluster CA only for this, it must not follow the tasks' proxy settings,
and the service-account token never passes through a client that user code holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import httpx
import msgspec
import structlog

from service.config import ConfigError, PodDeletionCostSettings
from service.metrics import Metrics

log = structlog.get_logger(__name__)

ANNOTATION: Final = "controller.kubernetes.io/pod-deletion-cost"
#: The annotation holds an int32.
MAX_COST: Final = 2**31 - 1
#: Failed requests are retried after the interval doubled per failure, up to this.
MAX_BACKOFF_SECONDS: Final = 300.0
#: The API answers a PATCH in milliseconds; a stuck one must not hold the loop long.
REQUEST_TIMEOUT: Final = httpx.Timeout(5.0)
MERGE_PATCH: Final = "application/merge-patch+json"
#: Of an error answer, at most this much of the API's message is logged.
MESSAGE_LIMIT: Final = 300


def deletion_cost(active_runs: int) -> int:
    """The cost for ``active_runs``: the count itself (an int32, never negative)."""
    return min(max(active_runs, 0), MAX_COST)


class _Status(msgspec.Struct):
    """The parts of a Kubernetes ``Status`` answer worth logging."""

    reason: str = ""
    message: str = ""


class _Metadata(msgspec.Struct):
    annotations: dict[str, str] | None = None


class _Pod(msgspec.Struct):
    metadata: _Metadata = msgspec.field(default_factory=_Metadata)


class _RequestFailed(Exception):
    def __init__(self, status: int | None, reason: str, message: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.message = message[:MESSAGE_LIMIT]


class PodDeletionCost:
    """Keeps the annotation in step with ``active_count()`` while not ``draining()``."""

    def __init__(
        self,
        settings: PodDeletionCostSettings,
        *,
        active_count: Callable[[], int],
        draining: Callable[[], bool],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._active_count = active_count
        self._draining = draining
        self._metrics = metrics
        self._clock = clock
        self._path = f"/api/v1/namespaces/{settings.namespace}/pods/{settings.pod_name}"
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        #: The value the pod's annotation holds, as far as we know (None: unknown).
        self._sent: int | None = None
        self._read_current = False
        self._stopped = False
        self._failures = 0
        self._updated_once = False
        self._next_allowed = float("-inf")

    async def start(self) -> None:
        """Open the API client (trusting the cluster CA) and start the update loop."""
        self._client = self.open_client()
        self._task = asyncio.create_task(self._run(), name="quiesce-pod-deletion-cost")
        log.info(
            "pod_deletion_cost_enabled",
            pod=self._settings.pod_name,
            namespace=self._settings.namespace,
            interval_s=self._settings.interval_seconds,
        )

    def open_client(self) -> httpx.AsyncClient:
        try:
            context = ssl.create_default_context(cafile=self._settings.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"QUIESCE_POD_DELETION_COST: cannot load the cluster CA "
                f"{self._settings.ca_file}: {exc}"
            ) from None
        self._client = httpx.AsyncClient(
            base_url=self._settings.api_url,
            verify=context,
            timeout=REQUEST_TIMEOUT,
            limits=httpx.Limits(max_connections=1),
            follow_redirects=False,
            trust_env=False,  # no proxy or netrc from the environment for the API server
        )
        return self._client

    async def stop(self) -> None:
        """Stop updating and close the client (the annotation keeps its last value)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        while not self._stopped:
            await self.tick()
            wait = max(self._settings.interval_seconds, self._next_allowed - self._clock())
            await asyncio.sleep(wait)

    async def tick(self) -> None:
        """One step: send the current cost if it changed and the interval allows it."""
        if self._stopped:
            return
        if self._draining():
            self._stopped = True
            log.info("pod_deletion_cost_stopped", reason="draining", cost=self._sent)
            return
        now = self._clock()
        if now < self._next_allowed:
            return
        try:
            if not self._read_current:
                await self._read_annotation()
            cost = deletion_cost(self._active_count())
            if cost == self._sent:
                return
            self._next_allowed = now + self._settings.interval_seconds
            await self._patch(cost)
        except _RequestFailed as failure:
            self._failed(now, failure)
        except Exception as exc:  # never fatal: the worst case is Kubernetes' own choice
            self._failed(now, _RequestFailed(None, type(exc).__name__))
        else:
            self._failures = 0

    async def _read_annotation(self) -> None:
        """Learn the value the pod holds (a restarted container's pod keeps it), once:
        when the read fails, the first PATCH goes out anyway."""
        self._read_current = True
        pod = msgspec.json.decode(await self._request("GET"), type=_Pod)
        current = (pod.metadata.annotations or {}).get(ANNOTATION)
        if current is not None:
            with contextlib.suppress(ValueError):
                self._sent = int(current)

    async def _patch(self, cost: int) -> None:
        body = {"metadata": {"annotations": {ANNOTATION: str(cost)}}}
        await self._request("PATCH", msgspec.json.encode(body))
        previous, self._sent = self._sent, cost
        self._metrics.pod_deletion_cost_updates.labels("updated").inc()
        # Said once at info (it works, or works again), then only at debug.
        level = log.info if self._failures or not self._updated_once else log.debug
        level("pod_deletion_cost_updated", cost=cost, previous=previous)
        self._updated_once = True

    async def _request(self, method: str, body: bytes | None = None) -> bytes:
        assert self._client is not None, "start() first"
        try:
            token = _read_token(self._settings.token_file)
        except (OSError, UnicodeDecodeError) as exc:
            raise _RequestFailed(None, "token_unreadable", type(exc).__name__) from None
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = MERGE_PATCH
        try:
            response = await self._client.request(method, self._path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise _RequestFailed(None, type(exc).__name__) from None
        if response.status_code != 200:
            status = _status_of(response.content)
            raise _RequestFailed(
                response.status_code, status.reason or response.reason_phrase, status.message
            )
        return response.content

    def _failed(self, now: float, failure: _RequestFailed) -> None:
        self._failures += 1
        self._metrics.pod_deletion_cost_updates.labels("failed").inc()
        backoff = min(
            self._settings.interval_seconds * 2**self._failures,
            max(MAX_BACKOFF_SECONDS, self._settings.interval_seconds),
        )
        # Jitter keeps the replicas of a Deployment from retrying in lockstep.
        retry_in = max(self._settings.interval_seconds, backoff * random.uniform(0.5, 1.0))  # noqa: S311
        self._next_allowed = now + retry_in
        log.warning(
            "pod_deletion_cost_failed",
            status=failure.status,
            reason=failure.reason,
            message=failure.message,
            pod=self._settings.pod_name,
            retry_in_s=round(retry_in, 1),
        )


def _read_token(path: str) -> str:
    """Read on every request: the kubelet rotates bound tokens (about hourly). The
    file is ~1 KB on a memory-backed volume, read once per interval at most, so a
    plain read does not hold the event loop up."""
    return Path(path).read_text(encoding="utf-8").strip()


def _status_of(content: bytes) -> _Status:
    try:
        return msgspec.json.decode(content, type=_Status)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _Status()
