"""The drain, end to end: the real Granian process, real signals, a real Redis.

Each test creates short runs (they finish within the grace) and long runs (they do
not), starts a drain the way a platform would, and checks what clients, Prometheus
and the store see: readiness 503 within a second (an HTTP answer, not a refused
connection), creates refused with 503, short runs ``succeeded``, long runs
``failed``/``shutdown`` with exactly one terminal event, open event streams ended
promptly, and exit code 0 within the grace plus 2 s of the drain's start.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from service.store.redis import RedisRunStore
from tests.conftest import RedisServer
from tests.e2e.conftest import (
    BIN,
    GRACE_SECONDS,
    ON_EVERY_LOOP,
    Server,
    start_server,
    stop,
    terminal_history,
)

# Each test runs on the asyncio loop and on uvloop: the bridge must work on both.
pytestmark = [pytest.mark.e2e, ON_EVERY_LOOP]

#: The contract's bound from the drain's start to the process's exit.
EXIT_BOUND_SECONDS = GRACE_SECONDS + 2
SHORT_SECONDS = 0.5
LONG_SECONDS = 30.0


@dataclass
class StreamResult:
    text: str
    ended_at: float


async def create_sleep(http: httpx.AsyncClient, seconds: float) -> str:
    response = await http.post("/v1/runs", json={"task": "sleep", "input": {"seconds": seconds}})
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    return run_id


async def read_stream(url: str, run_id: str, replayed: asyncio.Event | None = None) -> StreamResult:
    """Follow a run's event stream until the server ends it; ``replayed`` is set once
    the run's ``run_started`` event has arrived."""
    chunks = []
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=60.0)) as http,
        http.stream("GET", f"{url}/v1/runs/{run_id}/events/stream") as response,
    ):
        assert response.status_code == 200
        async for chunk in response.aiter_text():
            chunks.append(chunk)
            if replayed is not None and "event: run_started" in "".join(chunks):
                replayed.set()
    return StreamResult(text="".join(chunks), ended_at=time.time())


async def first_status(http: httpx.AsyncClient, path: str, status: int, within: float) -> float:
    """Poll ``path`` until it answers ``status``; when it did (wall clock, like the logs)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        response = await http.get(path)
        if response.status_code == status:
            return time.time()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} did not answer {status} within {within}s")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text``."""
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


async def assert_drain_outcome(store: RedisRunStore, short: list[str], long: list[str]) -> None:
    for run_id in short:
        record, history = await terminal_history(store, run_id)
        assert record.status == "succeeded", record
        assert history == ["run_started", "run_progress", "run_succeeded"]
    for run_id in long:
        record, history = await terminal_history(store, run_id)
        assert record.status == "failed", record
        assert record.error is not None
        assert record.error.reason == "shutdown"
        assert history == ["run_started", "run_failed"]


def drain_started_at(server: Server) -> float:
    """When the server began its drain (wall clock), from its ``drain_triggered`` log line."""
    for event in server.log_events():
        if event.get("event") == "drain_triggered":
            return datetime.fromisoformat(event["timestamp"]).timestamp()
    raise AssertionError(f"no drain_triggered event in the log:\n{server.log()}")


async def test_prestop_drain_then_sigterm(server: Server, redis_store: RedisRunStore) -> None:
    """Kubernetes' order: the preStop hook (`quiesce drain`) runs first, then SIGTERM."""
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        short = [await create_sleep(http, SHORT_SECONDS) for _ in range(2)]
        long = [await create_sleep(http, LONG_SECONDS) for _ in range(2)]
        stream = asyncio.create_task(read_stream(server.url, long[0]))
        await asyncio.sleep(0.3)  # the stream is open

        hook = await asyncio.create_subprocess_exec(
            str(BIN / "quiesce"), "drain", "--timeout", "10",
            env=server.command_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            # The hook is a new Python process: allow for its start, then measure
            # from the moment the server began the drain.
            not_ready = await first_status(http, "/readyz", 503, within=5.0)
            started = drain_started_at(server)
            assert not_ready - started < 1.0
            assert (await http.get("/readyz")).json() == {"status": "draining"}
            assert (await http.get("/healthz")).status_code == 200
            refused = await http.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 1}})
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) > 0
            during = (await http.get("/metrics")).text
            assert metric(during, "quiesce_draining") == 1
            assert 2 <= metric(during, "quiesce_active_runs") <= 4
            assert metric(during, "quiesce_runs_rejected_total", reason="draining") == 1
            assert (await http.get(f"/v1/runs/{long[1]}")).json()["status"] == "running"

            result = await asyncio.wait_for(stream, 5.0)
            assert result.ended_at - started < 1.0
            assert "retry: " in result.text
            assert "event: run_started" in result.text

            out, err = await asyncio.wait_for(hook.communicate(), 15)
        finally:
            if hook.returncode is None:
                hook.kill()
                await hook.wait()
        assert hook.returncode == 0, err.decode()
        assert b"drain: finished" in out
        # The hook returned; the server still answers until the kubelet's SIGTERM.
        after = (await http.get("/metrics")).text
        shutdown = {"task": "sleep", "reason": "shutdown"}
        assert metric(after, "quiesce_run_cancellations_total", **shutdown) == 2
        assert metric(after, "quiesce_runs_finished_total", task="sleep", status="failed") == 2
        assert metric(after, "quiesce_active_runs") == 0
        assert (await http.get("/admin/state")).json()["state"] == "stopped"

        server.signal(signal.SIGTERM)
        code, _ = await asyncio.to_thread(server.wait_exit, EXIT_BOUND_SECONDS + 5)
        exited = time.time()
    assert code == 0, server.log()
    assert exited - started <= EXIT_BOUND_SECONDS
    await assert_drain_outcome(redis_store, short, long)
    assert_no_loop_errors(server)


def assert_no_loop_errors(server: Server) -> None:
    """Nothing the event loop reported (a future's exception never retrieved, a task
    destroyed while pending): each is a drain step that went wrong unseen."""
    errors = [e for e in server.log_events() if e.get("logger") == "asyncio"]
    assert not errors, errors


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_alone_drains_and_exits_0(
    server: Server, redis_store: RedisRunStore, stop_signal: signal.Signals
) -> None:
    """No preStop hook (docker stop, a Heroku restart, Ctrl+C): the signal starts the drain."""
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        short = [await create_sleep(http, SHORT_SECONDS) for _ in range(2)]
        long = [await create_sleep(http, LONG_SECONDS) for _ in range(2)]
        stream = asyncio.create_task(read_stream(server.url, long[0]))
        await asyncio.sleep(0.3)

        server.signal(stop_signal)
        started = time.time()
        assert await first_status(http, "/readyz", 503, within=1.0) - started < 1.0
        refused = await http.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 1}})
        assert refused.status_code == 503
        assert "retry-after" in refused.headers
        during = (await http.get("/metrics")).text
        assert metric(during, "quiesce_draining") == 1
        assert 2 <= metric(during, "quiesce_active_runs") <= 4

        result = await asyncio.wait_for(stream, 2.0)
        assert result.ended_at - started < 1.0
        assert "retry: " in result.text
        # A stream opened during the drain ends at once, so it cannot delay the exit.
        late = await asyncio.wait_for(read_stream(server.url, long[1]), 2.0)
        assert "retry: " in late.text

        code, _ = await asyncio.to_thread(server.wait_exit, EXIT_BOUND_SECONDS + 5)
        exited = time.time()
    assert code == 0, server.log()
    assert exited - started <= EXIT_BOUND_SECONDS, server.log()
    await assert_drain_outcome(redis_store, short, long)
    assert_no_loop_errors(server)
    # Granian's main process stops its worker with SIGTERM whichever signal it got.
    triggers = [e["trigger"] for e in server.log_events() if e.get("event") == "drain_triggered"]
    assert triggers == ["SIGTERM"]


async def test_a_drain_over_http_without_sigterm_still_exits_0(server: Server) -> None:
    """A drain asked for by hand: the server stops by itself at the drain's deadline."""
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        run_id = await create_sleep(http, SHORT_SECONDS)
        started = time.monotonic()
        drained = await http.post("/admin/drain")
        assert drained.status_code == 202
        assert drained.json()["drain"]["trigger"] == "admin"
        again = await http.post("/admin/drain")  # idempotent: the same drain
        assert again.json()["drain"]["started_at"] == drained.json()["drain"]["started_at"]
        code, exited = await asyncio.to_thread(server.wait_exit, EXIT_BOUND_SECONDS + 5)
        assert code == 0, server.log()
        assert exited - started <= EXIT_BOUND_SECONDS
    # The worker asks Granian's main process to stop; it sends SIGTERM back, which
    # hands control to Granian: a clean exit of both processes.
    stopping = [e for e in server.log_events() if e.get("event") == "stopping_server"]
    assert [e["via"] for e in stopping] == ["main_process", "worker_signal"]
    assert any(
        e.get("event") == "run_finished" and e["run_id"] == run_id for e in server.log_events()
    )


async def test_a_second_signal_neither_restarts_nor_extends_the_drain(
    tmp_path: Path, redis_server: RedisServer, worker_loop: str
) -> None:
    server = start_server(tmp_path, redis_server.url, worker_loop=worker_loop)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            await create_sleep(http, LONG_SECONDS)
        started = server.signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        server.signal(signal.SIGTERM)
        code, exited = await asyncio.to_thread(server.wait_exit, EXIT_BOUND_SECONDS + 5)
        assert code == 0
        assert exited - started <= EXIT_BOUND_SECONDS
        triggers = [e for e in server.log_events() if e.get("event") == "drain_triggered"]
        assert len(triggers) == 1
    finally:
        stop(server)
