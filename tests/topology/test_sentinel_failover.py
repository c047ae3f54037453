"""A Sentinel master SIGKILLed while creates, progress appends and a stream run.

Clients see only 202 or 503 + Retry-After; the service follows the promoted replica by
itself; with QUIESCE_REDIS_MIN_REPLICAS=1 no accepted run is lost; every run reaches
exactly one terminal event; the stream resumes with Last-Event-ID and its events are
in order, without repeats. The figures go to the test's output (-s), and
bench/sentinel_failover.py prints them with and without confirmation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.topology.failover import TERMINAL_EVENTS, run_failover

pytestmark = [pytest.mark.slow, pytest.mark.topology, pytest.mark.timeout(120)]


async def test_a_sentinel_failover_loses_no_confirmed_run(tmp_path: Path) -> None:
    outcome = await run_failover(tmp_path, min_replicas=1)
    print(f"sentinel failover, QUIESCE_REDIS_MIN_REPLICAS=1: {outcome.figures()}")
    assert outcome.bad_answers == []
    assert set(outcome.statuses) <= {202, 503}
    assert outcome.statuses.get(503), "the failover was not seen at all"
    assert outcome.recovery_seconds is not None
    assert outcome.lost == [], sentinel_story(tmp_path)
    assert outcome.stuck == []
    assert outcome.not_one_terminal == []
    # The stream: resumed after the failover, each event once, in order, one terminal.
    ids = [event["id"] for event in outcome.stream_events]
    assert len(ids) == len(set(ids))
    keys = [tuple(int(part) for part in event_id.split("-")) for event_id in ids]
    assert keys == sorted(keys)
    types = [event["type"] for event in outcome.stream_events]
    assert sum(t in TERMINAL_EVENTS for t in types) == 1
    assert types[-1] in TERMINAL_EVENTS
    assert outcome.stream_reconnects >= 1


def sentinel_story(directory: Path) -> str:
    """What the sentinels did (failover steps, aborts, reconfigurations): the first
    thing to read when an accepted run is missing after the failover."""
    marks = ("failover", "switch-master", "convert-to-slave", "promoted", "sdown", "odown")
    lines = [
        f"{log.name}: {line}"
        for log in sorted(directory.glob("sentinel-*/sentinel-*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if any(mark in line for mark in marks)
    ]
    return "\n".join(lines)
