"""Create throughput: POST /v1/runs on three servers started side by side, one run.

(a) baseline  — bench/baseline_app.py: strict decode + 202, no persistence, no run;
(b) memory    — ``quiesce serve`` with the embedded memory store;
(c) redis     — ``quiesce serve`` with a redis-server this script starts (durable:
                the 202 is sent after the record is in Redis).

Each is a real Granian process with one worker on a free port, started with the
Granian command line of ``quiesce serve``. wrk (bench/post_create.lua) drives each in
turn with the body ``{"task":"sleep","input":{"seconds":0}}``; the order rotates
every round so no server always goes first. Because the machine is shared, the
figures that mean something are the ratios (b)/(a) and (c)/(a) of one run; each is
the median over the rounds.

``--seconds 3600`` makes the runs outlive the measurement, so (b) and (c) pay for
admission and persistence only, not for executing and finalizing the runs.

Usage: .venv/bin/python bench/create_throughput.py [--rounds 3] [--duration 10] [--seconds 0]
       [--idempotency]
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field

import httpx
import msgspec
from support import BENCH_DIR, Processes, Started, load_of, median, post_accepted, wrk

AIM = 0.70


@dataclass
class Round:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    server_cpu_ms_per_req: float
    redis_cpu_ms_per_req: float | None


@dataclass
class Target:
    key: str
    label: str
    server: Started
    redis: Started | None = None
    rounds: list[Round] = field(default_factory=list)


def measure(target: Target, args: argparse.Namespace) -> Round:
    url = f"{target.server.url}/v1/runs"
    cpu_before = target.server.cpu_seconds()
    redis_before = target.redis.cpu_seconds() if target.redis else 0.0
    result = wrk(
        url,
        seconds=args.duration,
        connections=args.connections,
        threads=args.threads,
        body=args.body,
        key_prefix=secrets.token_hex(4) if args.idempotency else None,
    )
    cpu = target.server.cpu_seconds() - cpu_before
    redis_cpu = target.redis.cpu_seconds() - redis_before if target.redis else None
    load = load_of(result)
    requests = max(load.requests, 1)
    return Round(
        rps=load.rps,
        p50_ms=load.p50_ms,
        p99_ms=load.p99_ms,
        non_2xx=load.non_2xx,
        socket_errors=load.socket_errors,
        server_cpu_ms_per_req=cpu * 1000 / requests,
        redis_cpu_ms_per_req=None if redis_cpu is None else redis_cpu * 1000 / requests,
    )


def runs_finished(target: Target) -> int | None:
    """quiesce_runs_finished_total{status="succeeded"}: the runs were really executed."""
    if target.key == "a":
        return None
    text = httpx.get(f"{target.server.url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("quiesce_runs_finished_total{") and 'status="succeeded"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def report(targets: list[Target], args: argparse.Namespace) -> None:
    base = median([r.rps for r in targets[0].rounds])
    print()
    print(
        f"POST /v1/runs {args.body.decode()}, "
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
        f"{args.rounds} rounds (medians; per-round req/s in brackets)"
    )
    header = (
        f"{'server':<34} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>8} "
        f"{'sock err':>8} {'srv CPU ms/req':>14} {'redis CPU ms/req':>16} {'vs (a)':>7}"
    )
    print(header)
    print("-" * len(header))
    for target in targets:
        rounds = target.rounds
        rps = median([r.rps for r in rounds])
        redis_cpu = (
            f"{median([r.redis_cpu_ms_per_req or 0.0 for r in rounds]):.3f}"
            if target.redis
            else "-"
        )
        print(
            f"{target.label:<34} {rps:>7.0f} {median([r.p50_ms for r in rounds]):>7.1f} "
            f"{median([r.p99_ms for r in rounds]):>7.1f} {sum(r.non_2xx for r in rounds):>8} "
            f"{sum(r.socket_errors for r in rounds):>8} "
            f"{median([r.server_cpu_ms_per_req for r in rounds]):>14.3f} {redis_cpu:>16} "
            f"{rps / base:>7.0%}"
        )
        print(f"{'':<34} [{', '.join(f'{r.rps:.0f}' for r in rounds)}]")
    print()
    for target in targets[1:]:
        ratios = [r.rps / a.rps for r, a in zip(target.rounds, targets[0].rounds, strict=True)]
        print(
            f"({target.key})/(a): median of per-round ratios {median(ratios):.0%} "
            f"[{', '.join(f'{x:.0%}' for x in ratios)}]"
        )
    c_ratio = median(
        [r.rps / a.rps for r, a in zip(targets[2].rounds, targets[0].rounds, strict=True)]
    )
    verdict = "meets" if c_ratio >= AIM else "does NOT meet"
    print(f"durable create (c) at {c_ratio:.0%} of (a): {verdict} the {AIM:.0%} aim")
    for target in targets[1:]:
        print(f"({target.key}) runs executed to success: {runs_finished(target)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per server")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--seconds",
        type=float,
        default=0.0,
        help="the sleep runs' length (default 0: each run executes and finishes at once; "
        "e.g. 3600 measures admission and persistence alone, the runs stay active)",
    )
    parser.add_argument(
        "--idempotency",
        action="store_true",
        help="every request with its own Idempotency-Key (the key is claimed in the store too)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args()
    args.body = msgspec.json.encode({"task": "sleep", "input": {"seconds": args.seconds}})
    if shutil.which("wrk") is None:
        print("wrk is not on PATH: apt-get install -y wrk", file=sys.stderr)
        return 2

    quiesce_env = {
        "QUIESCE_MAX_ACTIVE_RUNS": "100000",
        "QUIESCE_SHUTDOWN_GRACE_SECONDS": "5",
    }
    with Processes(keep_logs=args.keep_logs) as procs:
        redis = procs.redis_server()
        targets = [
            Target(
                "a",
                "(a) baseline: decode + 202",
                procs.granian_app("baseline", "baseline_app:create_app", BENCH_DIR),
            ),
            Target("b", "(b) quiesce, memory store", procs.quiesce("memory", quiesce_env)),
            Target(
                "c",
                "(c) quiesce, redis (durable)",
                procs.quiesce(
                    "redis",
                    {**quiesce_env, "QUIESCE_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"},
                ),
                redis=redis,
            ),
        ]
        for target in targets:
            post_accepted(f"{target.server.url}/v1/runs", args.body)
        urls = ", ".join(f"{t.key}={t.server.url}" for t in targets)
        print(f"servers: {urls}; logs in {procs.workdir}")
        for target in targets:
            wrk(
                f"{target.server.url}/v1/runs",
                seconds=args.warmup,
                connections=args.connections,
                threads=args.threads,
                body=args.body,
            )
        for i in range(args.rounds):
            order = targets[i % 3 :] + targets[: i % 3]
            for target in order:
                time.sleep(1.0)  # let the previous server's runs finish
                measured = measure(target, args)
                target.rounds.append(measured)
                print(
                    f"round {i + 1} {target.key}: {measured.rps:7.0f} req/s  "
                    f"p50 {measured.p50_ms:.1f} ms  p99 {measured.p99_ms:.1f} ms  "
                    f"non-2xx {measured.non_2xx}",
                    flush=True,
                )
        report(targets, args)
        for target in targets:
            if target.server.process.poll() is not None:
                print(f"warning: {target.label} exited during the benchmark", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
