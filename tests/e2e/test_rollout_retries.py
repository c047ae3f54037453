"""No run lost to a rollout or a crash: three real replicas on one real Redis, runs
with ``retry`` longer than the grace, each replica stopped in turn as the kubelet does
(preStop ``quiesce drain``, then SIGTERM) and one SIGKILLed (see ``rollout``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.store.redis import RedisRunStore
from tests.conftest import RedisServer
from tests.e2e.conftest import Server, start_server
from tests.e2e.rollout import Rollout, RunOutcome

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GRACE_SECONDS = 1.0
LEASE_SECONDS = 3.0
#: Longer than the grace: every run on a stopping replica outlives its drain.
RUN_SECONDS = 3.0


def alternates(run: RunOutcome) -> bool:
    """run_started 1, (run_requeued n, run_started n+1)*, one terminal event: never two
    attempts running at once, and nothing after the end."""
    kinds = [kind for kind, _, _ in run.history]
    *attempts, last = kinds
    if last not in ("run_succeeded", "run_failed", "run_cancelled"):
        return False
    expected = ["run_started"] + ["run_requeued", "run_started"] * ((len(attempts) - 1) // 2)
    if attempts != expected:
        return False
    numbers = [n for kind, n, _ in run.history if kind in ("run_started", "run_requeued")]
    return numbers == [1 + i // 2 for i in range(len(numbers))]


async def test_a_rollout_and_a_crash_lose_no_retryable_run(
    tmp_path: Path, redis_server: RedisServer, redis_store: RedisRunStore
) -> None:
    def start(worker_id: str) -> Server:
        return start_server(
            tmp_path,
            redis_server.url,
            QUIESCE_WORKER_ID=worker_id,
            QUIESCE_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
            QUIESCE_LEASE_TTL_SECONDS=str(LEASE_SECONDS),
        )

    report = await Rollout(start, redis_store, replicas=3, run_seconds=RUN_SECONDS).run()
    figures = report.figures()
    print(figures)

    assert len(report.stopped) == 3
    assert len(report.killed) == 1
    assert report.runs, "no run was created"
    assert [r for r in report.runs if r.status != "succeeded"] == []
    assert all(alternates(run) for run in report.runs), [
        run.history for run in report.runs if not alternates(run)
    ]
    # Every requeue happened on a replica that was stopped or killed, for that reason.
    gone = set(report.stopped) | set(report.killed)
    for run in report.runs:
        history = run.history
        for index, (kind, _, reason) in enumerate(history):
            if kind == "run_requeued":
                worker = history[index - 1][2]
                assert worker in gone, run
                expected = "worker_lost" if worker in report.killed else "shutdown"
                assert reason == expected, run
        moved = any(kind == "run_requeued" for kind, _, _ in history)
        assert (run.attempt >= 2) == moved, run
    # Each kind of loss happened (else this test would prove nothing).
    assert figures["requeued_shutdown"] > 0, figures
    assert figures["requeued_worker_lost"] > 0, figures
