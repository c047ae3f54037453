"""The pod's deletion-cost annotation, against a fake Kubernetes API over TLS.

The updater is driven step by step (``tick()``) with a clock the test moves, so "only
on change" and "at most once per interval" are asserted by counting requests, not by
timing them. What the fake server checks is what the API server would: the path of
the pod's own object, the bearer token, the merge-patch content type and the body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
import trustme

from service.config import ConfigError, Settings
from service.metrics import Metrics
from service.pod_deletion_cost import PodDeletionCost
from tests.integration.fake_kube_api import (
    ANNOTATION,
    POD,
    POD_PATH,
    FakeKubeAPI,
    make_sa_dir,
)
from tests.integration.support import metric

TOKEN_ONE = "eyJhbGciOiJSUzI1NiJ9.first-token-value.signature"
TOKEN_TWO = "eyJhbGciOiJSUzI1NiJ9.second-token-value.signature"
INTERVAL = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Runs:
    """The active run count and drain flag the updater reads."""

    def __init__(self) -> None:
        self.active = 0
        self.draining = False


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeKubeAPI]:
    ca = trustme.CA()
    server = FakeKubeAPI(ca=ca, sa_dir=make_sa_dir(tmp_path / "sa", ca, TOKEN_ONE))
    await server.start()
    yield server
    await server.close()


def settings_for(api: FakeKubeAPI, *, interval: float = INTERVAL) -> Settings:
    host, _, port = api.url.removeprefix("https://").partition(":")
    environ = {
        "QUIESCE_POD_DELETION_COST": "true",
        "QUIESCE_POD_DELETION_COST_INTERVAL_SECONDS": str(interval),
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "QUIESCE_WORKER_ID": POD,
    }
    return Settings.from_env(environ, service_account_dir=str(api.sa_dir))


@pytest.fixture
def runs() -> Runs:
    return Runs()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(max_active_runs=10)


@pytest.fixture
async def updater(
    api: FakeKubeAPI, runs: Runs, clock: Clock, metrics: Metrics
) -> AsyncIterator[PodDeletionCost]:
    settings = settings_for(api).pod_deletion_cost
    assert settings is not None
    instance = PodDeletionCost(
        settings,
        active_count=lambda: runs.active,
        draining=lambda: runs.draining,
        metrics=metrics,
        clock=clock,
    )
    instance.open_client()  # tick() by hand: no background loop
    yield instance
    await instance.stop()


def outcome(metrics: Metrics, name: str) -> float | None:
    return metric(
        metrics.render().decode(), "quiesce_pod_deletion_cost_updates_total", outcome=name
    )


async def test_a_patch_is_a_merge_patch_of_the_pods_own_annotation(
    api: FakeKubeAPI, updater: PodDeletionCost, runs: Runs
) -> None:
    runs.active = 3
    await updater.tick()
    # First the pod is read (its annotation may be left from an earlier container).
    assert [(r.method, r.path) for r in api.requests] == [("GET", POD_PATH), ("PATCH", POD_PATH)]
    for request in api.requests:
        assert request.headers["authorization"] == f"Bearer {TOKEN_ONE}"
    patch = api.patches[0]
    assert patch.headers["content-type"] == "application/merge-patch+json"
    assert patch.json() == {"metadata": {"annotations": {ANNOTATION: "3"}}}
    assert api.annotations == {ANNOTATION: "3"}


async def test_patches_only_on_change_and_at_most_once_per_interval(
    api: FakeKubeAPI, updater: PodDeletionCost, runs: Runs, clock: Clock, metrics: Metrics
) -> None:
    await updater.tick()
    assert api.patched_values() == ["0"]
    # Within the interval: the count changes twice, nothing is sent.
    runs.active = 4
    await updater.tick()
    clock.now += INTERVAL / 2
    runs.active = 5
    await updater.tick()
    assert api.patched_values() == ["0"]
    # The interval has passed: the current value goes out, once.
    clock.now += INTERVAL / 2
    await updater.tick()
    await updater.tick()
    assert api.patched_values() == ["0", "5"]
    # Unchanged after any time: nothing is sent.
    for _ in range(3):
        clock.now += INTERVAL * 3
        await updater.tick()
    assert api.patched_values() == ["0", "5"]
    # Back to idle: the next tick sends it (the last patch is long past).
    runs.active = 0
    await updater.tick()
    assert api.patched_values() == ["0", "5", "0"]
    assert [r.method for r in api.requests].count("GET") == 1
    assert outcome(metrics, "updated") == 3
    assert outcome(metrics, "failed") == 0


async def test_a_value_already_on_the_pod_is_not_sent_again(
    api: FakeKubeAPI, updater: PodDeletionCost, runs: Runs
) -> None:
    api.annotations[ANNOTATION] = "2"
    runs.active = 2
    await updater.tick()
    assert [r.method for r in api.requests] == ["GET"]


async def test_the_token_file_is_read_again_for_every_request(
    api: FakeKubeAPI, updater: PodDeletionCost, runs: Runs, clock: Clock
) -> None:
    await updater.tick()
    api.write_token(TOKEN_TWO)  # the kubelet rotated the bound token
    runs.active = 1
    clock.now += INTERVAL
    await updater.tick()
    tokens = [r.headers["authorization"] for r in api.requests]
    assert tokens == [f"Bearer {TOKEN_ONE}", f"Bearer {TOKEN_ONE}", f"Bearer {TOKEN_TWO}"]


@pytest.mark.parametrize("status", [403, 500])
async def test_a_refused_patch_is_logged_counted_and_retried_with_backoff(
    api: FakeKubeAPI,
    updater: PodDeletionCost,
    runs: Runs,
    clock: Clock,
    metrics: Metrics,
    status: int,
) -> None:
    api.status = status
    runs.active = 2
    with structlog.testing.capture_logs() as logs:
        await updater.tick()  # the read fails
        clock.now += INTERVAL  # less than the backoff: nothing is sent
        await updater.tick()
        sent_while_backing_off = len(api.requests)
        clock.now += 1000  # the backoff has passed
        await updater.tick()  # the patch fails
    assert sent_while_backing_off == 1
    assert [r.method for r in api.requests] == ["GET", "PATCH"]
    failures = [line for line in logs if line["event"] == "pod_deletion_cost_failed"]
    assert len(failures) == 2
    assert {line["status"] for line in failures} == {status}
    assert failures[0]["reason"] == {403: "Forbidden", 500: "InternalError"}[status]
    assert all(line["log_level"] == "warning" for line in failures)
    assert outcome(metrics, "failed") == 2
    assert outcome(metrics, "updated") == 0
    # The API recovers: the value goes out at the next allowed tick.
    api.status = 200
    clock.now += 1000
    await updater.tick()
    assert api.patched_values() == ["2", "2"]
    assert api.annotations == {ANNOTATION: "2"}
    assert outcome(metrics, "updated") == 1


async def test_the_token_never_appears_in_logs(
    api: FakeKubeAPI, updater: PodDeletionCost, runs: Runs, clock: Clock
) -> None:
    with structlog.testing.capture_logs() as logs:
        await updater.tick()
        api.status = 403
        for active in range(1, 4):
            runs.active = active
            clock.now += 1000
            await updater.tick()
    assert any(line["event"] == "pod_deletion_cost_failed" for line in logs)
    assert any(line["event"] == "pod_deletion_cost_updated" for line in logs)
    text = repr(logs)
    assert TOKEN_ONE not in text
    assert "first-token-value" not in text


async def test_an_unreachable_api_server_is_a_counted_failure(
    api: FakeKubeAPI, updater: PodDeletionCost, metrics: Metrics
) -> None:
    await api.close()
    with structlog.testing.capture_logs() as logs:
        await updater.tick()
    [failure] = [line for line in logs if line["event"] == "pod_deletion_cost_failed"]
    assert failure["status"] is None
    assert failure["reason"] == "ConnectError"
    assert outcome(metrics, "failed") == 1


async def test_an_unreadable_token_is_a_counted_failure(
    api: FakeKubeAPI, updater: PodDeletionCost, metrics: Metrics
) -> None:
    (api.sa_dir / "token").unlink()
    with structlog.testing.capture_logs() as logs:
        await updater.tick()
    [failure] = [line for line in logs if line["event"] == "pod_deletion_cost_failed"]
    assert failure["reason"] == "token_unreadable"
    assert api.requests == []
    assert outcome(metrics, "failed") == 1


async def test_a_server_the_cluster_ca_did_not_sign_is_refused(
    api: FakeKubeAPI, updater: PodDeletionCost
) -> None:
    await updater.stop()
    trustme.CA().cert_pem.write_to_path(str(api.sa_dir / "ca.crt"))  # another cluster's CA
    updater.open_client()
    with structlog.testing.capture_logs() as logs:
        await updater.tick()
    assert api.requests == []
    assert [line["reason"] for line in logs if line["event"] == "pod_deletion_cost_failed"] == [
        "ConnectError"
    ]


async def test_updates_stop_once_the_pod_drains(
    api: FakeKubeAPI, updater: PodDeletionCost, runs: Runs, clock: Clock
) -> None:
    runs.active = 7
    await updater.tick()
    runs.draining = True
    with structlog.testing.capture_logs() as logs:
        for active in (3, 0):
            runs.active = active
            clock.now += INTERVAL * 2
            await updater.tick()
    # The annotation keeps its last value: a draining pod is not ready, and the
    # ReplicaSet deletes not-ready pods first whatever their cost.
    assert api.patched_values() == ["7"]
    assert [line["event"] for line in logs] == ["pod_deletion_cost_stopped"]


async def test_the_cost_is_the_active_run_count_within_int32(
    api: FakeKubeAPI, updater: PodDeletionCost, runs: Runs
) -> None:
    runs.active = 2**40
    await updater.tick()
    assert api.patched_values() == [str(2**31 - 1)]


async def test_a_ca_file_that_is_no_certificate_stops_the_start(api: FakeKubeAPI) -> None:
    (api.sa_dir / "ca.crt").write_text("not a certificate", encoding="utf-8")
    settings = settings_for(api).pod_deletion_cost
    assert settings is not None
    updater = PodDeletionCost(
        settings, active_count=lambda: 0, draining=lambda: False, metrics=Metrics(max_active_runs=1)
    )
    with pytest.raises(ConfigError, match="QUIESCE_POD_DELETION_COST: cannot load the cluster CA"):
        await updater.start()
    await updater.stop()
