"""Section ``peers`` of ``perf.py``: Quiesce against the stacks it replaces.

Side by side, each a real server process with one worker, each on its own
``redis-server``:

* **Quiesce** — ``quiesce serve`` with the Redis store (record and idempotency key in
  Redis before the 202; the run then executes in the same process);
* **FastAPI + redis-py** — ``peers/fastapi_redis.py`` under uvicorn: pydantic
  validation, the idempotency key claimed, the record and its ``run_started`` event
  written, then the 202;
* **FastAPI → arq** — ``peers/fastapi_arq.py`` under uvicorn enqueues an arq job (id =
  the idempotency key), run by an arq worker process; after each load the section
  waits for the worker to empty the queue and reports how long that took.

uvicorn runs with its defaults: uvloop and httptools when installed (the ``bench``
extra installs ``uvicorn[standard]``). wrk drives each at 64 connections. Goal:
Quiesce's req/s ≥ 3x each peer's, with no non-2xx answer.
"""

from __future__ import annotations

import importlib.util
import time

import redis
from create_load import Server, check_alive, measure, plan_for, quiesce_redis, ratio
from perf_table import Options, Row
from support import BENCH_DIR, Processes, Started, granian_loop, passed_settings

CONNECTIONS = 64
MIN_RATIO = 3.0
PEERS_DIR = BENCH_DIR / "peers"
#: What the peers import (the ``bench`` extra).
PEER_PACKAGES = ("fastapi", "pydantic", "uvicorn", "arq")
#: The longest wait for arq's worker to empty its queue after a load.
DRAIN_TIMEOUT_SECONDS = 300.0
ARQ_QUEUE = "arq:queue"


def run(options: Options) -> list[Row]:
    missing = [name for name in PEER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        note = f"not installed ({', '.join(missing)}): pip install -e '.[bench]'"
        print(f"  peers: {note}")
        return [
            Row(goal, "—", note, None, f"≥ {MIN_RATIO:.1f}", None)
            for goal in ("vs FastAPI + redis-py", "vs FastAPI → arq")
        ]
    plan = plan_for(options)
    settings = passed_settings()
    loop = granian_loop(settings)
    uvicorn = uvicorn_flavour()
    with Processes(keep_logs=options.keep_logs) as procs:
        redis_of = {
            name: procs.redis_server(f"redis-{name}") for name in ("quiesce", "fastapi", "arq")
        }
        peer_env = {name: {"BENCH_REDIS_URL": redis_url(redis_of[name])} for name in redis_of}
        started = {
            "quiesce": quiesce_redis(procs, "quiesce", redis_of["quiesce"], settings),
            "fastapi-redis": procs.uvicorn_app(
                "fastapi-redis", "fastapi_redis:app", PEERS_DIR, peer_env["fastapi"]
            ),
            "fastapi-arq": procs.uvicorn_app(
                "fastapi-arq", "fastapi_arq:app", PEERS_DIR, peer_env["arq"]
            ),
        }
        started["arq-worker"] = procs.python_module(
            "arq-worker", ["arq", "fastapi_arq.WorkerSettings"], PEERS_DIR, peer_env["arq"]
        )
        if options.keep_logs:
            print(f"  peers: logs in {procs.workdir}")
        arq_client = redis.Redis(port=redis_of["arq"].port)
        quiesce = Server(f"Quiesce, Redis store ({loop})", f"{started['quiesce'].url}/v1/runs")
        fastapi = Server(
            f"FastAPI + redis-py ({uvicorn})", f"{started['fastapi-redis'].url}/v1/runs"
        )
        arq = Server(
            f"FastAPI → arq ({uvicorn})",
            f"{started['fastapi-arq'].url}/v1/runs",
            after_load=lambda server: wait_for_arq(server, arq_client),
        )
        measure("peers", [quiesce, fastapi, arq], plan, CONNECTIONS)
        check_alive(started)
        arq_client.close()
    judged = not options.smoke
    drain = max(arq.notes["drain_seconds"])
    return [
        row(
            "vs FastAPI + redis-py", quiesce, fastapi, f"FastAPI + redis-py ({uvicorn})", "", judged
        ),
        row(
            "vs FastAPI → arq",
            quiesce,
            arq,
            f"FastAPI → arq ({uvicorn}), accepted",
            f"; the worker's backlog drained up to {drain:.1f} s after a {plan.seconds} s load",
            judged,
        ),
    ]


def row(goal: str, quiesce: Server, peer: Server, label: str, extra: str, judged: bool) -> Row:
    share = ratio(quiesce, peer, CONNECTIONS)
    met = share >= MIN_RATIO and quiesce.failures(CONNECTIONS) == 0
    return Row(
        goal=f"{goal}, {CONNECTIONS} conns",
        measured=f"Quiesce (Redis): {quiesce.summary(CONNECTIONS)}",
        reference=f"{label}: {peer.summary(CONNECTIONS)}{extra}",
        ratio=share,
        target=f"≥ {MIN_RATIO:.1f}; 0 non-2xx",
        met=met if judged else None,
    )


def wait_for_arq(server: Server, client: redis.Redis) -> None:
    """Block until arq's worker has run every job of the load (each job leaves the
    queue once finished); note how long that took."""
    began = time.monotonic()
    while client.zcard(ARQ_QUEUE):
        if time.monotonic() - began > DRAIN_TIMEOUT_SECONDS:
            raise RuntimeError(f"arq's queue not empty {DRAIN_TIMEOUT_SECONDS:g} s after the load")
        time.sleep(0.05)
    server.notes.setdefault("drain_seconds", []).append(time.monotonic() - began)


def redis_url(server: Started) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


def uvicorn_flavour() -> str:
    """The loop and HTTP parser uvicorn picks by default."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop}, {http}"
