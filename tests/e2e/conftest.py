"""The real thing: ``quiesce serve`` (Granian) in a subprocess on a free port, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from service.schemas import RunRecord, event_type
from service.store.redis import RedisRunStore
from tests.conftest import RedisServer, free_port

BIN = Path(sys.executable).parent
GRACE_SECONDS = 2.0
#: The event loops the drain is proven on (``QUIESCE_EVENT_LOOP``); tests that take
#: ``worker_loop`` run once on each, the others on the default (``auto``).
EVENT_LOOPS = ("asyncio", "uvloop")
ON_EVERY_LOOP = pytest.mark.parametrize("worker_loop", EVENT_LOOPS)


@dataclass
class Server:
    """A running ``quiesce serve`` process."""

    process: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, sig: signal.Signals) -> float:
        """Send ``sig`` to Granian's main process; return when it was sent (monotonic)."""
        self.process.send_signal(sig)
        return time.monotonic()

    def crash(self) -> None:
        """SIGKILL Granian's main process and its worker at once, as an OOM kill would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def wait_exit(self, within: float) -> tuple[int, float]:
        """Wait for the process to exit; (exit code, when it exited, monotonic)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code, time.monotonic()
            time.sleep(0.01)
        raise AssertionError(f"the server did not exit within {within}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                events.append(msgspec.json.decode(line))
        return events

    def worker_loop(self) -> str | None:
        """The event loop the worker runs, as the drain bridge reported it."""
        for event in self.log_events():
            if event.get("event") == "granian_bridge_installed":
                return str(event["loop"])
        return None

    def command_env(self) -> dict[str, str]:
        """The environment for ``quiesce drain`` run beside the server (the preStop hook)."""
        return dict(self.env)


def start_server(
    tmp_path: Path, redis_url: str, *, worker_loop: str | None = None, **extra_env: str
) -> Server:
    """Start ``quiesce serve``; with ``worker_loop``, on that event loop (checked)."""
    port = free_port()
    if worker_loop is not None:
        extra_env["QUIESCE_EVENT_LOOP"] = worker_loop
    env = {
        "PATH": os.environ["PATH"],
        "PORT": str(port),
        "QUIESCE_REDIS_URL": redis_url,
        "QUIESCE_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
        "QUIESCE_WORKER_ID": "e2e-worker",
        "QUIESCE_LOG_FORMAT": "json",
        **extra_env,
    }
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(BIN / "quiesce"), "serve", "--host", "127.0.0.1"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own: a crash can take main and worker
        )
    server = Server(process=process, port=port, env=env, log_path=log_path)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited at start:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=0.5).status_code == 200:
                if worker_loop is not None:
                    assert server.worker_loop() == worker_loop, server.log()
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the server did not become ready:\n{server.log()}")


def stop(server: Server) -> None:
    """Make sure nothing of the server is left running."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


@pytest.fixture
def worker_loop() -> str | None:
    """The default loop; :data:`ON_EVERY_LOOP` parametrizes it over both."""
    return None


@pytest.fixture
def server(tmp_path: Path, redis_server: RedisServer, worker_loop: str | None) -> Iterator[Server]:
    instance = start_server(tmp_path, redis_server.url, worker_loop=worker_loop)
    yield instance
    stop(instance)


async def terminal_history(store: RedisRunStore, run_id: str) -> tuple[RunRecord, list[str]]:
    """The run's record and its event types, as the store holds them."""
    record = await store.get(run_id)
    events = await store.events(run_id, after=None, limit=1000)
    assert record is not None
    assert events is not None
    return record, [event_type(event) for event in events]
