"""Create throughput on the asyncio loop and on uvloop, side by side in one run.

Six servers at once, each a real Granian process with one worker, all with the
Granian command line of ``quiesce serve`` and ``QUIESCE_EVENT_LOOP`` set to the loop:
the bare endpoint (``baseline_app.py``), ``quiesce serve`` with the memory store,
and with a redis-server this script starts — each on asyncio and on uvloop. wrk
(``post_create.lua``, one thread, 64 connections) drives each in turn, the order
rotating every round; the table gives the medians over the rounds, each server's
figure against the bare endpoint on the same loop, and the server's CPU time per
request (user + system of the process tree), which load from other processes on a
shared machine disturbs far less than requests per second.

Usage: .venv/bin/python bench/event_loops.py [--rounds 5] [--duration 5]
"""

from __future__ import annotations

import argparse

from create_throughput import wrk
from support import REPO, Processes, Started, _port_open, base_env, free_port, median, wait_until

LOOPS = ("asyncio", "uvloop")
KINDS = ("bare", "memory", "redis")
BODY = b'{"task":"sleep","input":{"seconds":0}}'


def bare(procs: Processes, loop: str) -> Started:
    from service.cli import APP_FACTORY, granian_argv
    from service.config import Settings

    port = free_port()
    env = {
        **base_env(),
        "PORT": str(port),
        "PYTHONPATH": str(REPO / "bench"),
        "QUIESCE_EVENT_LOOP": loop,
    }
    argv = granian_argv(Settings.from_env(env), "127.0.0.1")
    argv[argv.index(APP_FACTORY)] = "baseline_app:create_app"
    started = procs.spawn(f"bare-{loop}", argv, env=env, port=port)
    wait_until(lambda: _port_open(port), 30, started, "the bare endpoint did not start")
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args()

    with Processes(keep_logs=args.keep_logs) as procs:
        redis = procs.redis_server()
        servers: dict[tuple[str, str], Started] = {}
        for loop in LOOPS:
            common = {"QUIESCE_EVENT_LOOP": loop, "QUIESCE_MAX_ACTIVE_RUNS": "100000"}
            servers["bare", loop] = bare(procs, loop)
            servers["memory", loop] = procs.quiesce(f"memory-{loop}", common)
            redis_url = f"redis://127.0.0.1:{redis.port}/0"
            servers["redis", loop] = procs.quiesce(
                f"redis-{loop}", {**common, "QUIESCE_REDIS_URL": redis_url}
            )
        for server in servers.values():  # warm-up
            wrk(f"{server.url}/v1/runs", seconds=2, connections=args.connections, threads=1)

        results: dict[tuple[str, str], list[tuple[float, float, int, float]]] = {
            key: [] for key in servers
        }
        keys = list(servers)
        for round_ in range(args.rounds):
            shift = round_ % len(keys)
            for key in keys[shift:] + keys[:shift]:
                server = servers[key]
                cpu_before = server.cpu_seconds()
                out = wrk(
                    f"{server.url}/v1/runs",
                    seconds=args.duration,
                    connections=args.connections,
                    threads=1,
                    body=BODY,
                )
                cpu = server.cpu_seconds() - cpu_before
                requests = max(out["requests"], 1)
                results[key].append(
                    (
                        out["requests"] / (out["duration_us"] / 1e6),
                        out["p99_us"] / 1000,
                        out["non_2xx_3xx"],
                        cpu * 1e6 / requests,
                    )
                )

    print(
        f"\nPOST /v1/runs {BODY.decode()}, wrk -t1 -c{args.connections}, "
        f"{args.rounds} rounds of {args.duration:g} s (medians)\n"
    )
    print("| server | loop | req/s | p99 ms | non-2xx | vs bare, same loop | server CPU µs/req |")
    print("|---|---|---|---|---|---|---|")
    for kind in KINDS:
        for loop in LOOPS:
            rounds = results[kind, loop]
            rps = median([r[0] for r in rounds])
            base = median([r[0] for r in results["bare", loop]])
            print(
                f"| {kind} | {loop} | {rps:,.0f} | {median([r[1] for r in rounds]):.1f} "
                f"| {sum(r[2] for r in rounds)} | {rps / base:.2f} "
                f"| {median([r[3] for r in rounds]):.0f} |"
            )


if __name__ == "__main__":
    main()
