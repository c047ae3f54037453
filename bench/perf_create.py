"""Section ``create`` of ``perf.py``: a durable create against a bare endpoint.

Side by side, each a real server process with one worker on a free port:

* **bare** — ``baseline_app.py`` (strict decode of the body with the service's own
  decoder, ``input`` validated, 202; no store, no run) under the Granian command line
  of ``quiesce serve`` (``service.cli.granian_argv``), event loop included;
* **Quiesce** — ``quiesce serve`` on its own ``redis-server``: the run's record and
  its idempotency key are in Redis before the 202, and the run then executes.

wrk (``post_create.lua``, every request with its own ``Idempotency-Key``) drives both
at 64 and at 256 connections. Goal: Quiesce at ≥ 0.70x the bare endpoint's req/s,
its p99 ≤ 2x the bare p99, and no non-2xx answer or socket error.
"""

from __future__ import annotations

from create_load import Server, check_alive, measure, plan_for, quiesce_redis, ratio
from perf_table import Options, Row
from support import BENCH_DIR, Processes, granian_loop, passed_settings

CONNECTIONS = (64, 256)
MIN_RATIO = 0.70
MAX_P99_FACTOR = 2.0


def run(options: Options) -> list[Row]:
    plan = plan_for(options)
    # The settings both servers get: the bare endpoint runs on Quiesce's event loop.
    settings = passed_settings()
    loop = granian_loop(settings)
    with Processes(keep_logs=options.keep_logs) as procs:
        redis = procs.redis_server()
        started = {
            "bare": procs.granian_app("bare", "baseline_app:create_app", BENCH_DIR, settings),
            "quiesce": quiesce_redis(procs, "quiesce", redis, settings),
        }
        if options.keep_logs:
            print(f"  create: logs in {procs.workdir}")
        bare = Server(f"bare endpoint ({loop})", f"{started['bare'].url}/v1/runs")
        quiesce = Server(f"Quiesce, Redis store ({loop})", f"{started['quiesce'].url}/v1/runs")
        for connections in CONNECTIONS:
            measure("create", [bare, quiesce], plan, connections)
            check_alive(started)
    return [
        row(bare, quiesce, connections, loop, judged=not options.smoke)
        for connections in CONNECTIONS
    ]


def row(bare: Server, quiesce: Server, connections: int, loop: str, *, judged: bool) -> Row:
    share = ratio(quiesce, bare, connections)
    p99_factor = quiesce.p99_ms(connections) / bare.p99_ms(connections)
    failures = quiesce.failures(connections)
    met = share >= MIN_RATIO and p99_factor <= MAX_P99_FACTOR and failures == 0
    return Row(
        goal=f"create, {connections} conns",
        measured=f"Quiesce (Redis, {loop}): {quiesce.summary(connections)}; "
        f"p99 {p99_factor:.2f}x bare",
        reference=f"bare endpoint ({loop}): {bare.summary(connections)}",
        ratio=share,
        target=f"≥ {MIN_RATIO:.2f}; p99 ≤ {MAX_P99_FACTOR:g}x bare; 0 non-2xx",
        met=met if judged else None,
    )
