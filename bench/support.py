"""What the benchmarks share: free ports, a private redis-server, Granian and
uvicorn servers, wrk, CPU accounting of a process tree, and cleanup of everything
they start.

Every process is started through a :class:`Processes` instance, used as a context
manager: on the way out (normal return, exception or Ctrl-C) it stops each process
it started — SIGTERM, then SIGKILL after a few seconds — so no Granian worker and
no redis-server outlives a benchmark.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Started:
    """A process a benchmark started, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU of this process and all its descendants (Linux /proc)."""
        return sum(_cpu_of(pid) for pid in _tree(self.process.pid))


@dataclass
class Processes:
    """Starts processes and guarantees they are stopped; owns a temporary log dir."""

    started: list[Started] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="quiesce-bench-")))
    keep_logs: bool = False

    def __enter__(self) -> Processes:
        # A SIGTERM to the benchmark itself must also run the cleanup below.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
        if not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> Started:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                argv,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killed as one
            )
        started = Started(name=name, process=process, log_path=log_path, port=port)
        self.started.append(started)
        return started

    def stop(self, started: Started, *, timeout: float = 5.0) -> None:
        process = started.process
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
        # The group as well: a Granian worker whose main process died must not linger.
        _signal_group(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait(timeout)

    def stop_all(self) -> None:
        for started in reversed(self.started):
            self.stop(started)
        self.started.clear()

    # --- the servers -------------------------------------------------------------

    def redis_server(self, name: str = "redis") -> Started:
        """A private redis-server on a free port: no persistence, loopback only."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH (apt-get install -y redis-server)")
        port = free_port()
        argv = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "yes",
        ]  # fmt: skip
        started = self.spawn(name, argv, port=port)
        wait_until(lambda: _redis_answers(port), 10, started, "redis-server did not start")
        return started

    def quiesce(self, name: str, env: dict[str, str], *, ready_timeout: float = 30) -> Started:
        """``quiesce serve --host 127.0.0.1`` (the exact Granian argv) on a free port."""
        port = free_port()
        full_env = {**base_env(), "PORT": str(port), **env}
        started = self.spawn(
            name, [str(BIN / "quiesce"), "serve", "--host", "127.0.0.1"], env=full_env, port=port
        )
        wait_until(
            lambda: _status(f"{started.url}/readyz") == 200,
            ready_timeout,
            started,
            "quiesce did not become ready",
        )
        return started

    def granian_app(
        self, name: str, factory: str, pythonpath: Path, env: dict[str, str] | None = None
    ) -> Started:
        """Another app factory under the same Granian command line as ``quiesce serve``.

        ``env`` holds the ``QUIESCE_*`` settings the Quiesce server it is compared with
        gets, so both command lines agree (the event loop above all; see granian_loop).
        """
        from service.cli import APP_FACTORY

        port = free_port()
        full_env = {**base_env(), "PORT": str(port), "PYTHONPATH": str(pythonpath), **(env or {})}
        argv = quiesce_granian_argv(full_env)
        argv[argv.index(APP_FACTORY)] = factory
        started = self.spawn(name, argv, env=full_env, port=port)
        wait_until(lambda: _port_open(port), 30, started, f"{name} did not start listening")
        return started

    def uvicorn_app(
        self, name: str, app: str, pythonpath: Path, env: dict[str, str] | None = None
    ) -> Started:
        """An ASGI app under ``uvicorn`` with its defaults: one worker, and the loop and
        HTTP parser it picks (uvloop and httptools when installed). Ready once it listens
        (uvicorn opens the port after the app's lifespan startup)."""
        port = free_port()
        full_env = {**base_env(), "PYTHONPATH": str(pythonpath), **(env or {})}
        argv = [
            sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        started = self.spawn(name, argv, env=full_env, port=port)
        wait_until(lambda: _port_open(port), 30, started, f"{name} did not start listening")
        return started

    def python_module(
        self, name: str, argv: list[str], pythonpath: Path, env: dict[str, str] | None = None
    ) -> Started:
        """``python -m <argv>`` (e.g. a queue's worker), with no port to wait for."""
        full_env = {**base_env(), "PYTHONPATH": str(pythonpath), **(env or {})}
        started = self.spawn(name, [sys.executable, "-m", *argv], env=full_env)
        time.sleep(0.5)
        if started.process.poll() is not None:
            raise RuntimeError(f"{name} exited at once\n{started.log()[-4000:]}")
        return started


def quiesce_granian_argv(env: dict[str, str]) -> list[str]:
    """The Granian command line ``quiesce serve`` runs with the environment ``env``."""
    from service.cli import granian_argv
    from service.config import Settings

    return granian_argv(Settings.from_env(env), "127.0.0.1")


#: The settings a caller may give the benchmarked servers through the environment
#: (``base_env`` drops every other ``QUIESCE_*``): e.g. ``QUIESCE_EVENT_LOOP=asyncio``.
PASSED_SETTINGS = ("QUIESCE_EVENT_LOOP",)


def passed_settings() -> dict[str, str]:
    return {name: os.environ[name] for name in PASSED_SETTINGS if name in os.environ}


def granian_loop(env: dict[str, str] | None = None) -> str:
    """The event loop ``quiesce serve`` gives Granian with these ``QUIESCE_*`` settings."""
    argv = quiesce_granian_argv({**base_env(), **(env or {})})
    return argv[argv.index("--loop") + 1]


def wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    threads: int,
    body: bytes,
    key_prefix: str | None = None,
) -> dict[str, int]:
    """One ``wrk`` run of ``post_create.lua``: its JSON result line, as a dict.

    With ``key_prefix`` every request carries its own ``Idempotency-Key``
    (``<prefix>-<thread>-<n>``): make the prefix unique per run against one store.
    """
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s",
        "-s", str(BENCH_DIR / "post_create.lua"), url,
    ]  # fmt: skip
    env = {**os.environ, "BENCH_BODY": body.decode()}
    env.pop("BENCH_KEY_PREFIX", None)
    if key_prefix is not None:
        env["BENCH_KEY_PREFIX"] = key_prefix
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    match = re.search(r"^WRK_RESULT (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result: dict[str, int] = json.loads(match.group(1))
    return result


@dataclass(frozen=True)
class Load:
    """One wrk run's figures."""

    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def failures(self) -> int:
        return self.non_2xx + self.socket_errors


def load_of(result: dict[str, int]) -> Load:
    """The figures of a :func:`wrk` result."""
    return Load(
        requests=result["requests"],
        rps=result["requests"] / (result["duration_us"] / 1e6),
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        non_2xx=result["non_2xx_3xx"],
        socket_errors=sum(
            result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
        ),
    )


def post_accepted(url: str, body: bytes, headers: dict[str, str] | None = None) -> None:
    """One create must be a 202 before a load starts (a 429 or 401 would skew it)."""
    response = httpx.post(
        url,
        content=body,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=5,
    )
    if response.status_code != 202:
        raise RuntimeError(f"{url}: a create answered {response.status_code}: {response.text}")


def base_env() -> dict[str, str]:
    """A clean environment for the service: no inherited QUIESCE_*/REDIS_URL settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIESCE_")}
    env.pop("REDIS_URL", None)
    env["QUIESCE_LOG_FORMAT"] = "json"
    env["QUIESCE_WORKER_ID"] = "bench-worker"
    return env


def wait_until(check: Callable[[], bool], within: float, started: Started, message: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            raise RuntimeError(f"{message}: {started.name} exited\n{started.log()[-4000:]}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{message} within {within}s\n{started.log()[-4000:]}")


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=0.5).status_code
    except httpx.HTTPError:
        return None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _redis_answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ")" field 0 is state; utime and stime are fields 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
