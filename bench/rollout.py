"""Rollout figures: a rolling update and a crash at load, with ``retry`` on every run.

Three ``quiesce serve`` replicas on a redis-server of this script's own; two creators
post ``sleep`` runs (``--run-seconds``, longer than the grace) with
``"retry": {"max_attempts": 5}``; each replica in turn gets the preStop hook
(``quiesce drain``) then SIGTERM, and is replaced by a new pod; then one replica is
SIGKILLed (its process group) and replaced. Every run is then read back from Redis.
Printed: runs, how they ended, requeues (by reason), adoptions, the highest attempt,
and how long after the SIGKILL the killed replica's runs had all succeeded.

It drives the same scenario as ``tests/e2e/test_rollout_retries.py`` (the driver is
``tests/e2e/rollout.py``), with its own settings.

Usage: .venv/bin/python bench/rollout.py [--grace 1] [--lease 3] [--run-seconds 3]
       [--interval 0.1] [--repeat 1] [--handoff]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from support import free_port  # noqa: E402

from service.store.redis import RedisRunStore  # noqa: E402
from tests.conftest import RedisServer  # noqa: E402
from tests.e2e.conftest import Server, start_server  # noqa: E402
from tests.e2e.rollout import Rollout  # noqa: E402


async def once(args: argparse.Namespace, logs: Path) -> dict[str, object]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (apt-get install -y redis-server)")
    redis_server = RedisServer(binary=binary, port=free_port())
    redis_server.start()
    store = RedisRunStore(redis_server.url, retention_seconds=3600)
    try:
        await store.start()

        def start(worker_id: str) -> Server:
            extra = {"QUIESCE_HANDOFF_ON_DRAIN": "true"} if args.handoff else {}
            return start_server(
                logs,
                redis_server.url,
                QUIESCE_WORKER_ID=worker_id,
                QUIESCE_SHUTDOWN_GRACE_SECONDS=str(args.grace),
                QUIESCE_LEASE_TTL_SECONDS=str(args.lease),
                QUIESCE_LOG_FORMAT="json",
                **extra,
            )

        rollout = Rollout(
            start,
            store,
            replicas=3,
            run_seconds=args.run_seconds,
            create_interval=args.interval,
        )
        report = await rollout.run()
        return report.figures()
    finally:
        await store.close()
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--run-seconds", type=float, default=3.0)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--handoff", action="store_true", help="QUIESCE_HANDOFF_ON_DRAIN=true")
    args = parser.parse_args()
    print(
        f"grace {args.grace:g} s, lease {args.lease:g} s, runs of {args.run_seconds:g} s, "
        f"a create every {args.interval:g} s per creator (2), handoff {args.handoff}"
    )
    columns = (
        "runs", "succeeded", "failed", "requeued", "requeued_shutdown",
        "requeued_worker_lost", "adopted", "max_attempt", "crash_recovery_seconds", "seconds",
    )  # fmt: skip
    print(" | ".join(columns))
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="quiesce-rollout-") as logs:
            figures = asyncio.run(once(args, Path(logs)))
        print(" | ".join(str(figures[c]) for c in columns))


if __name__ == "__main__":
    main()
