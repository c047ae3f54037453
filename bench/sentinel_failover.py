"""A Sentinel failover under load, with and without QUIESCE_REDIS_MIN_REPLICAS.

Runs the scenario of tests/topology/failover.py twice — a real ``quiesce serve``, a
master + replica + 3 sentinels, the master SIGKILLed while creates (each retried with
its Idempotency-Key on 503), progress appends and an event stream run, the old master
started again once a replica is promoted — and prints, for each: accepted runs, runs
lost (accepted, then 404), runs stuck, the longest 503 window a client saw, the time
to promotion and to the first 202 after the kill.

Usage: .venv/bin/python bench/sentinel_failover.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.topology.failover import run_failover  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    for attempt in range(args.repeat):
        for min_replicas in (0, 1):
            directory = Path(tempfile.mkdtemp(prefix="quiesce-failover-"))
            outcome = asyncio.run(run_failover(directory, min_replicas=min_replicas))
            print(
                f"[{attempt + 1}] QUIESCE_REDIS_MIN_REPLICAS={min_replicas}: {outcome.figures()}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
