"""What both benchmarks share: free ports, a private redis-server, Granian servers,
CPU accounting of a process tree, and cleanup of everything they start.

Every process is started through a :class:`Processes` instance, used as a context
manager: on the way out (normal return, exception or Ctrl-C) it stops each process
it started — SIGTERM, then SIGKILL after a few seconds — so no Granian worker and
no redis-server outlives a benchmark.
"""

from __future__ import annotations

import contextlib
import os
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

    def granian_app(self, name: str, factory: str, pythonpath: Path) -> Started:
        """Another app factory under the same Granian command line as ``quiesce serve``."""
        from service.cli import APP_FACTORY, granian_argv
        from service.config import Settings

        port = free_port()
        env = {**base_env(), "PORT": str(port), "PYTHONPATH": str(pythonpath)}
        argv = granian_argv(Settings.from_env(env), "127.0.0.1")
        argv[argv.index(APP_FACTORY)] = factory
        started = self.spawn(name, argv, env=env, port=port)
        wait_until(lambda: _port_open(port), 30, started, f"{name} did not start listening")
        return started


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
