"""Create cost in-process: the app's own CPU per ``POST /v1/runs``, without a server.

The ASGI app is called directly (its lifespan run by hand) by N concurrent callers,
so what is measured is the Python of the request path and of the runs it starts —
no Granian hand-off, no sockets to a client, no wrk sharing the cores. Three apps
are measured one after another in this process's children:

(a) baseline — bench/baseline_app.py (strict decode + 202);
(b) memory   — ``create_app()`` with the memory store;
(c) redis    — ``create_app()`` on a redis-server this script starts.

CPU µs per create (user + system of the measuring process) is the figure to compare;
req/s moves with whatever else the machine runs. ``--seconds 0`` (default) executes
each run (start, one progress event, finish); ``--seconds 3600`` leaves them running.
``--profile DIR`` runs each measurement under ``py-spy record`` (if installed) and
writes a collapsed-stack file per app there.

Usage: .venv/bin/python bench/create_inprocess.py [--creates 20000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from support import BENCH_DIR, REPO, Processes, median

ROLE_ENV = "QUIESCE_BENCH_INPROCESS_ROLE"


async def _drive(app: Any, *, creates: int, concurrency: int, body: bytes) -> dict[str, Any]:
    lifespan_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await lifespan_in.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, lifespan_in.get,
            lifespan_out.put)
    )  # fmt: skip
    started = await lifespan_out.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the app did not start: {started}")
    statuses: dict[int, int] = {}
    never = asyncio.Event()
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    scope_template = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/runs", "raw_path": b"/v1/runs", "root_path": "",
        "query_string": b"", "headers": headers, "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }  # fmt: skip

    async def one() -> None:
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app({**scope_template, "state": {}}, receive, send)
        statuses[status] = statuses.get(status, 0) + 1

    async def caller(count: list[int], total: int) -> None:
        while count[0] < total:
            count[0] += 1
            await one()

    # Warm-up: imports, first-use caches, the store's scripts.
    await asyncio.gather(*(caller([0], 200) for _ in range(1)))
    await asyncio.sleep(0.5)
    statuses.clear()
    count = [0]
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(count, creates) for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    await asyncio.sleep(0.5)
    await lifespan_in.put({"type": "lifespan.shutdown"})
    await lifespan_out.get()
    await lifespan
    return {"cpu_us": cpu * 1e6 / creates, "rps": creates / wall, "statuses": statuses}


def _child(role: str, args: argparse.Namespace) -> None:
    """Measure one app in this process; print one result line."""
    body = b'{"task":"sleep","input":{"seconds":%s}}' % str(args.seconds).encode()
    if role == "baseline":
        sys.path.insert(0, str(BENCH_DIR))
        from baseline_app import create_app as baseline

        app: Any = baseline()
    else:
        from service.web.app import create_app

        app = create_app()
    # The service logs two lines per run: to /dev/null, as to a pod's log pipe.
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    result = asyncio.run(_drive(app, creates=args.creates, concurrency=args.concurrency, body=body))
    print(f"RESULT {role} {result['cpu_us']:.1f} {result['rps']:.0f} {result['statuses']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--creates", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.0, help="the sleep runs' length")
    parser.add_argument("--profile", type=Path, help="write py-spy collapsed stacks here")
    args = parser.parse_args()
    role = os.environ.get(ROLE_ENV)
    if role:
        _child(role, args)
        return 0
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.profile and not Path(py_spy).exists():
        print("--profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    results: dict[str, list[float]] = {"baseline": [], "memory": [], "redis": []}
    with Processes() as procs:
        redis = procs.redis_server()
        for round_ in range(args.rounds):
            for role in results:
                env = {
                    **os.environ,
                    ROLE_ENV: role,
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                    "QUIESCE_LOG_FORMAT": "json",
                    "QUIESCE_MAX_ACTIVE_RUNS": "1000000",
                    "QUIESCE_WORKER_ID": "bench-worker",
                }
                env.pop("QUIESCE_REDIS_URL", None)
                if role == "redis":
                    env["QUIESCE_REDIS_URL"] = f"redis://127.0.0.1:{redis.port}/0"
                argv = [sys.executable, __file__, *sys.argv[1:]]
                if args.profile and round_ == 0:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    out = args.profile / f"{role}.txt"
                    argv = [py_spy, "record", "-r", "400", "-f", "raw", "-o", str(out), "--",
                            *argv]  # fmt: skip
                done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{role} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
                _, _, cpu_us, rps, statuses = line.split(" ", 4)
                results[role].append(float(cpu_us))
                print(f"round {round_ + 1} {role:<8} {float(cpu_us):6.1f} CPU µs/create  "
                      f"{rps:>6} req/s  {statuses}", flush=True)  # fmt: skip
    base = median(results["baseline"])
    print(f"\nPOST /v1/runs in-process, {args.creates} creates, {args.concurrency} concurrent, "
          f"runs of {args.seconds:g} s (medians of {args.rounds})")  # fmt: skip
    for role, values in results.items():
        cost = median(values)
        print(f"{role:<8} {cost:7.1f} CPU µs/create   {cost / base:5.2f}x the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
