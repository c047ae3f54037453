"""``quiesce``: the one command a pod, a Procfile and a developer use.

* ``quiesce serve`` — validate the configuration, then run Granian in this process
  (it becomes Granian's main process, with the same PID) serving the app, set up
  for a pod: ASGI interface, 0.0.0.0:$PORT, one worker, the app factory, the event
  loop of ``QUIESCE_EVENT_LOOP`` (uvloop when installed), no respawn of a failed
  worker (a dead worker exits the process, so Kubernetes restarts the pod), and
  connection limits that leave room for probes beside every stream the replica
  admits (see :func:`granian_backpressure`).
* ``quiesce check`` — validate the configuration and prove the store works: with
  Redis, a probe key written, read and deleted, every Lua script loaded and one
  called; it prints the Redis version, eviction policy and persistence, and a
  warning for each setting that may lose runs. Exit 0 when all is fine (warnings
  included), else 1 with a one-line reason (for an init container, or by hand).
* ``quiesce drain`` — the preStop hook: start the drain of the local server and
  wait until it has finished, at most ``--timeout`` seconds.

``quiesce serve`` first checks the store as ``check`` does (in a child process, while
it imports the app for the worker): a wrong mode, refused credentials, a TLS
certificate that does not verify or a Redis too old stop it with one line naming
``QUIESCE_REDIS_URL`` (exit 2); an unreachable Redis is only a warning.

Exit codes: 0 success; 1 the check or the drain failed; 2 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import os
import resource
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Final

from service import __version__
from service.config import ConfigError, Settings

APP_FACTORY: Final = "service.web.app:create_app"
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2


#: Granian's backpressure beyond twice the stream budget (see granian_backpressure).
BACKPRESSURE_RESERVE: Final = 64
#: The kernel's queue of connections not yet accepted: room for a burst of
#: reconnecting streams (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG: Final = 2048
#: Granian accepts header read timeouts up to this many milliseconds.
MAX_HEADER_READ_TIMEOUT_MS: Final = 60_000
#: File descriptors the worker needs besides its sockets (Redis, logs, modules).
FD_RESERVE: Final = 256
#: What ``quiesce serve`` imports before Granian forks the worker (see preload).
PRELOADED: Final = ("granian.cli", APP_FACTORY.partition(":")[0])
PRELOADED_WITH_REDIS: Final = ("service.store.redis",)
#: How long ``quiesce serve`` gives its store check before starting anyway.
PREFLIGHT_TIMEOUT_SECONDS: Final = 5.0


def granian_backpressure(settings: Settings) -> int:
    """How many requests Granian serves at once in the worker; the rest wait.

    Every open event stream holds one of these slots for as long as it lasts, and
    ``QUIESCE_MAX_STREAMS`` of them may be open. As many slots again are left for
    everything else — requests whose body is still arriving (each freed within the
    body timeout), keep-alive connections, creates, reads — plus a fixed reserve,
    so the probes and ``/metrics`` find a free slot even with every stream open
    (the default, 2,000 streams, gives 4,064; Granian's own default is 1,024).
    """
    return 2 * settings.max_streams + BACKPRESSURE_RESERVE


def granian_argv(settings: Settings, host: str) -> list[str]:
    """The Granian command line ``quiesce serve`` runs (also checked by the deploy tests)."""
    header_timeout_ms = min(
        max(round(settings.request_body_timeout_seconds * 1000), 1), MAX_HEADER_READ_TIMEOUT_MS
    )
    return [
        sys.executable, "-m", "granian",
        "--interface", "asgi",
        "--host", host,
        "--port", str(settings.port),
        "--workers", "1",
        "--loop", settings.loop,
        "--no-ws",
        "--backpressure", str(granian_backpressure(settings)),
        "--backlog", str(LISTEN_BACKLOG),
        # Headers get the body's time limit: a client that trickles them would
        # otherwise hold a slot for Granian's default of 30 s.
        "--http1-header-read-timeout", str(header_timeout_ms),
        "--log-config", str(resources.files("service").joinpath("granian_logging.json")),
        "--factory",
        APP_FACTORY,
    ]  # fmt: skip


def raise_fd_limit(needed: int) -> str | None:
    """Lift the soft open-files limit to the hard one; a warning if still below ``needed``.

    Every connection is a file descriptor, and container runtimes often start
    processes with a soft limit of 1,024 — fewer than the streams a replica admits.
    The limit is inherited by Granian's worker.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or hard > soft):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (
            f"warning: the open-files limit is {soft}, below the {needed} that "
            "QUIESCE_MAX_STREAMS and the connection limits need; raise it (ulimit -n)"
        )
    return None


def store_preflight(settings: Settings, timeout: float = PREFLIGHT_TIMEOUT_SECONDS) -> str | None:
    """Before serving: the one-line reason start-up must stop (None: go on).

    A wrong mode (QUIESCE_REDIS_MODE against what the server is, or a sentinel URL
    naming plain servers), refused credentials, a TLS certificate that does not
    verify or a server too old stop it (no restart fixes them); an unreachable Redis
    does not — it may be starting too — and is only a warning.
    """
    if settings.redis_url is None:
        return None
    from service.store import open_store
    from service.store.redis import RedisRunStore
    from service.store.redis_server import Misconfigured

    store = open_store(settings)
    assert isinstance(store, RedisRunStore)

    async def run() -> None:
        try:
            await asyncio.wait_for(store.self_check(), timeout)
        finally:
            await store.close()

    try:
        asyncio.run(run())
    except Misconfigured as exc:
        return str(exc)
    except ConfigError:
        raise  # a forced mode the server contradicts names its own variable
    except Exception as exc:  # unreachable, or anything else: serve, and say so
        reason = " ".join(str(exc).split()) or "no answer"
        print(f"warning: the store could not be checked at start: {reason}", file=sys.stderr)
    return None


def serve(args: argparse.Namespace) -> int:
    # Start-up allocates many objects and frees few, so the collector's passes over
    # them are wasted work (about a sixth of importing the app). It stays off until
    # the worker is ready: the worker inherits this when Granian forks it and its
    # lifespan turns it back on; this process turns it on again once it has forked.
    gc.disable()
    from service.granian_bridge import MAIN_PID_ENV

    settings = Settings.from_env(os.environ)
    verdict = start_store_preflight(settings)
    # Meanwhile (on another core), import what the worker runs: Granian's fork
    # inherits it, so the worker starts with nothing left to import.
    preload(settings)
    problem = verdict()
    if problem is not None:
        raise ConfigError(f"QUIESCE_REDIS_URL: {' '.join(problem.split())}")
    argv = granian_argv(settings, args.host)
    warning = raise_fd_limit(granian_backpressure(settings) + FD_RESERVE)
    if warning is not None:
        print(warning, file=sys.stderr)
    # This process becomes Granian's main process: the PID the bridge is told.
    os.environ[MAIN_PID_ENV] = str(os.getpid())
    os.register_at_fork(after_in_parent=_collect_again)
    return run_granian(argv)


def start_store_preflight(settings: Settings) -> Callable[[], str | None]:
    """Start :func:`store_preflight` in a child process; the result waits for its verdict.

    Nothing listens before the verdict is in. The check runs beside the imports of
    :func:`preload`, instead of before them. (A child that reports nothing, having
    crashed, leaves the check to this process.)
    """
    if settings.redis_url is None:
        return lambda: None
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without this process's exit handlers
        os.close(read_end)
        report: dict[str, str | None] = {}
        try:
            report["problem"] = store_preflight(settings)
        except ConfigError as exc:
            report["config_error"] = str(exc)
        finally:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(json.dumps(report).encode())
            sys.stderr.flush()
            os._exit(0)
    os.close(write_end)

    def verdict() -> str | None:
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        os.waitpid(pid, 0)
        report = json.loads(data) if data else {}
        if "config_error" in report:
            raise ConfigError(report["config_error"])
        if "problem" not in report:
            return store_preflight(settings)
        problem: str | None = report["problem"]
        return problem

    return verdict


def preload(settings: Settings) -> None:
    """Import the app (and the store it opens) ahead of Granian's fork of the worker."""
    modules = [*PRELOADED, *(PRELOADED_WITH_REDIS if settings.redis_url is not None else ())]
    for name in modules:
        importlib.import_module(name)


def _collect_again() -> None:
    """In Granian's main process, after it forked: what start-up built lives as long
    as the process, so it is left out of the collector's scans from now on."""
    gc.freeze()
    gc.enable()


def run_granian(argv: list[str]) -> int:
    """Run ``argv``, Granian's command line, in this process and return its exit code.

    Exactly what ``python -m granian ARGS`` does — the same option parsing, the
    ``GRANIAN_*`` variables included — without starting a second interpreter: the
    worker Granian forks inherits what is imported here already (the store's
    modules, after the store check), which shortens the start.
    """
    from granian.cli import cli

    try:
        cli.main(args=argv[3:], prog_name="granian", auto_envvar_prefix="GRANIAN")
    except SystemExit as exc:  # how a click command ends
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return EXIT_FAILED
    return 0


def check(args: argparse.Namespace) -> int:
    from service.store import open_store
    from service.store.redis import RedisRunStore
    from service.store.redis_server import CheckFailed, ServerReport
    from service.tasks.loader import build_registry

    settings = Settings.from_env(os.environ)
    registry = build_registry(settings)
    print(f"configuration: ok (worker {settings.worker_id}, port {settings.port})")
    print(f"tasks: {', '.join(t.name for t in registry)}")
    store = open_store(settings)
    if not isinstance(store, RedisRunStore):
        print("store: memory (QUIESCE_REDIS_URL is not set)")
        return 0

    async def deep_check() -> ServerReport:
        try:
            return await asyncio.wait_for(store.self_check(), args.timeout)
        except TimeoutError as exc:
            raise CheckFailed(f"unreachable: no answer within {args.timeout:g}s") from exc
        finally:
            await store.close()

    try:
        report = asyncio.run(deep_check())
    except CheckFailed as exc:
        reason = str(exc)
    except Exception as exc:  # anything else still gets one line, never a traceback
        reason = f"check failed: {type(exc).__name__}: {exc}"
    else:
        print(
            f"store: redis reachable (version {report.version or 'unknown'}); "
            "probe key written, read and deleted; scripts loaded"
        )
        policy = report.eviction_policy or "unknown"
        if report.topology is not None:
            print(f"redis: {report.topology.describe()}")
        if settings.redis_min_replicas:
            print(f"redis: probe write confirmed by {settings.redis_min_replicas} replicas (WAIT)")
        print(f"redis: maxmemory-policy {policy}; persistence {report.persistence()}")
        for setting, detail in report.warnings():
            print(f"warning: {setting} {detail}")
        return 0
    print(f"store: redis {' '.join(reason.split())}", file=sys.stderr)
    return EXIT_FAILED


def drain(args: argparse.Namespace) -> int:
    settings = Settings.from_env(os.environ)
    timeout = args.timeout if args.timeout is not None else settings.shutdown_grace_seconds + 5
    url = args.url or f"http://127.0.0.1:{settings.port}"
    headers = {}
    if settings.api_token is not None:
        headers["Authorization"] = f"Bearer {settings.api_token}"
    # --timeout bounds the whole command: the server is asked to answer a little earlier.
    query = urllib.parse.urlencode({"wait": max(timeout - 0.5, 0.0)})
    request = urllib.request.Request(  # noqa: S310 - an http URL built here
        f"{url}/admin/drain?{query}", data=b"", headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (OSError, ValueError) as exc:  # refused, timed out, unreachable, bad URL
        print(f"drain: no answer from {url}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if status != 202:
        print(f"drain: {url} answered {status}: {body.decode(errors='replace')}", file=sys.stderr)
        return EXIT_FAILED
    state = json.loads(body)
    drain_info = state.get("drain") or {}
    if state.get("state") != "stopped":
        print(
            f"drain: not finished after {timeout:g}s; "
            f"{state.get('active_count')} runs still active",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(
        f"drain: finished (trigger {drain_info.get('trigger')}, "
        f"{drain_info.get('active_at_start')} runs active at start, "
        f"{drain_info.get('cancelled')} cancelled)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quiesce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"quiesce {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="serve the API with Granian on $PORT")
    serve_cmd.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    serve_cmd.set_defaults(run=serve)

    check_cmd = commands.add_parser(
        "check", help="validate the configuration and prove the store works"
    )
    check_cmd.add_argument("--timeout", type=float, default=5.0, help="store timeout (seconds)")
    check_cmd.set_defaults(run=check)

    drain_cmd = commands.add_parser("drain", help="drain the local server (the preStop hook)")
    drain_cmd.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for the drain (default: QUIESCE_SHUTDOWN_GRACE_SECONDS + 5)",
    )
    drain_cmd.add_argument(
        "--url", default=None, help="server URL (default http://127.0.0.1:$PORT)"
    )
    drain_cmd.set_defaults(run=drain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return code
