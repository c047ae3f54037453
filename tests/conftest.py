"""Shared fixtures: a Redis of our own, the two stores, settings and an HTTP client.

The session starts its own ``redis-server`` on a free port, so tests may flush, stop
and restart it; no test touches a Redis it did not start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import redis
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.store import RunStore
from service.store.memory import MemoryRunStore
from service.store.redis import RedisRunStore
from service.web.app import create_app
from tests.topology.cluster import RedisClusterNodes, running_cluster

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUIRE_TOOLS = os.environ.get("QUIESCE_REQUIRE_TOOLS") == "1"


REPO = Path(__file__).resolve().parent.parent
#: Where tools may be besides PATH: the virtualenv (hadolint) and .ci/tools (promtool).
TOOL_DIRS = (Path(sys.executable).parent, REPO / ".ci" / "tools")


def require_tool(name: str) -> str:
    """The path of a tool; skip the test without it (fail in CI, where it must exist)."""
    path = shutil.which(name) or next(
        (str(d / name) for d in TOOL_DIRS if (d / name).is_file()), None
    )
    if path is None:
        message = f"{name} is not on PATH"
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """A redis-server process owned by the test session."""

    binary: str
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.running:
            return
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with redis.Redis(port=self.port, socket_connect_timeout=0.2) as client:
                    client.ping()
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def flush(self) -> None:
        with redis.Redis(port=self.port) as client:
            client.flushall()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    server = RedisServer(binary=require_tool("redis-server"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    """The session's Redis, running and empty at the start of the test."""
    redis_session.start()
    redis_session.flush()
    return redis_session


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisClusterNodes]:
    """A 3-master, 3-replica Redis Cluster for the session, torn down even on failure."""
    with running_cluster(require_tool("redis-server"), require_tool("redis-cli")) as nodes:
        yield nodes


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisClusterNodes) -> RedisClusterNodes:
    """The session's cluster, healthy and empty at the start of the test."""
    redis_cluster_session.wait_ok()
    redis_cluster_session.flush()
    return redis_cluster_session


@pytest.fixture
def settings() -> Settings:
    """Settings for tests: a token, a small grace, the memory store."""
    return Settings(
        worker_id="worker-a",
        api_token=TOKEN,
        shutdown_grace_seconds=0.5,
        log_format="json",
    )


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def any_settings(store_kind: str, settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """``settings`` with each store in turn (the test runs once per store)."""
    if store_kind == "memory":
        return settings
    server: RedisServer = request.getfixturevalue("redis_server")
    return replace(settings, redis_url=server.url)


def build_store(store_kind: str, request: pytest.FixtureRequest, **kwargs: Any) -> RunStore:
    """A new, unstarted store of the given kind (Redis: the test's own server)."""
    if store_kind == "memory":
        return MemoryRunStore(retention_seconds=3600, **kwargs)
    if store_kind == "cluster":
        nodes: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        return RedisRunStore(nodes.url, retention_seconds=3600, **kwargs)
    server: RedisServer = request.getfixturevalue("redis_server")
    return RedisRunStore(server.url, retention_seconds=3600, **kwargs)


@pytest.fixture
def new_store(store_kind: str, request: pytest.FixtureRequest) -> Callable[[], RunStore]:
    """Makes a new, unstarted store of ``store_kind`` (a module testing other
    topologies overrides this, and every store fixture and test below follows)."""
    return lambda: build_store(store_kind, request)


@pytest.fixture
async def store(new_store: Callable[[], RunStore]) -> AsyncIterator[RunStore]:
    """Each store in turn, started, closed after the test."""
    instance = new_store()
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisRunStore]:
    """A started RedisRunStore on the test's own Redis."""
    instance = RedisRunStore(redis_server.url, retention_seconds=3600)
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture
async def client(any_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """An HTTP client on an app with each store in turn, authenticated."""
    async with AsyncTestClient(create_app(any_settings)) as test_client:
        test_client.headers.update(AUTH)
        yield test_client
