"""``quiesce``: the one command a pod, a Procfile and a developer use.

* ``quiesce serve`` — validate the configuration, then replace this process with
  Granian serving the app, set up for a pod: ASGI interface, 0.0.0.0:$PORT, one
  worker, the app factory, the asyncio loop, no respawn of a failed worker (a dead
  worker exits the process, so Kubernetes restarts the pod).
* ``quiesce check`` — validate the configuration and prove the store works: with
  Redis, a probe key written, read and deleted, every Lua script loaded and one
  called; it prints the Redis version, eviction policy and persistence, and a
  warning for each setting that may lose runs. Exit 0 when all is fine (warnings
  included), else 1 with a one-line reason (for an init container, or by hand).
* ``quiesce drain`` — the preStop hook: start the drain of the local server and
  wait until it has finished, at most ``--timeout`` seconds.

Exit codes: 0 success; 1 the check or the drain failed; 2 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from importlib import resources
from typing import Final

from service import __version__
from service.config import ConfigError, Settings

APP_FACTORY: Final = "service.web.app:create_app"
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2


def granian_argv(settings: Settings, host: str) -> list[str]:
    """The Granian command line ``quiesce serve`` runs (also checked by the deploy tests)."""
    return [
        sys.executable, "-m", "granian",
        "--interface", "asgi",
        "--host", host,
        "--port", str(settings.port),
        "--workers", "1",
        "--loop", "asyncio",
        "--no-ws",
        "--log-config", str(resources.files("service").joinpath("granian_logging.json")),
        "--factory",
        APP_FACTORY,
    ]  # fmt: skip


def serve(args: argparse.Namespace) -> int:
    from service.granian_bridge import MAIN_PID_ENV

    settings = Settings.from_env(os.environ)
    argv = granian_argv(settings, args.host)
    # exec keeps this PID, so Granian's main process is the PID the bridge is told.
    env = {**os.environ, MAIN_PID_ENV: str(os.getpid())}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)  # noqa: S606 - a fixed argv, no shell


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
