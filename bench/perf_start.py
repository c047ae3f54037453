"""Cold start (serverless scale-from-zero): process start → ready, side by side.

A section of the performance bench (``bench/perf.py``; see ``perf_table.py``), also
runnable alone: ``.venv/bin/python bench/perf_start.py [--smoke] [--repetitions N]
[--compare-with DIR]`` (DIR: another checkout, e.g. the commit before a change, whose
``quiesce serve`` is started in the same run).

Three commands are started in turn, each from nothing, several times (the order
rotates every repetition, so none always runs first on a machine that warms up):

* **bare** — ``bench/baseline_app.py`` (Litestar + msgspec, no store) under the
  exact Granian command line of ``quiesce serve``; it has no readiness, so it is
  ready at its first HTTP answer of any status;
* **memory** — ``quiesce serve`` with the embedded store: ready at the first ``200``
  from ``/readyz``;
* **redis** — the same with ``QUIESCE_REDIS_URL`` on a redis-server this bench
  starts (its store check before Granian starts included).

The time is from just before the process is started to that answer, polled every
few milliseconds; each process is then stopped before the next starts. Each command
is started once, unmeasured, before the repetitions (bytecode compiled, files in the
page cache: what a replica started from an image finds). Each row gives the medians
of a Quiesce command and of the bare one in the same run, and the median of their
ratios within each repetition (see :func:`paired_ratio`).
"""

from __future__ import annotations

import http.client
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from perf_table import Options, Row, options_from, render, section_parser
from support import BIN, REPO, Processes, Started, base_env, free_port, median

#: Start → ready of a Quiesce command, at most this many times the bare endpoint's.
TARGET_RATIO = 1.20
REPETITIONS = 7
SMOKE_REPETITIONS = 2
#: How often readiness is polled; the resolution of the figures.
POLL_SECONDS = 0.005
READY_WITHIN_SECONDS = 30.0
BARE_FACTORY = "baseline_app:create_app"


def _answer(port: int, path: str) -> int | None:
    """The status of one GET, or None while nothing listens."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def _pythonpath(first: Path) -> str:
    """``first``, then whatever PYTHONPATH the bench itself was given."""
    return os.pathsep.join(filter(None, [str(first), os.environ.get("PYTHONPATH")]))


def _bare_argv(env: dict[str, str]) -> list[str]:
    from service.cli import APP_FACTORY, granian_argv
    from service.config import Settings

    argv = granian_argv(Settings.from_env(env), "127.0.0.1")
    argv[argv.index(APP_FACTORY)] = BARE_FACTORY
    return argv


def _time_to_ready(
    procs: Processes, name: str, argv: list[str], env: dict[str, str], ready: Callable[[int], bool]
) -> float:
    """Seconds from starting ``argv`` to ``ready``; the process is stopped afterwards."""
    port = int(env["PORT"])
    started_at = time.monotonic()
    started: Started = procs.spawn(name, argv, env=env, port=port)
    try:
        while not ready(port):
            if started.process.poll() is not None:
                raise RuntimeError(f"{name} exited at start:\n{started.log()[-4000:]}")
            if time.monotonic() - started_at > READY_WITHIN_SECONDS:
                raise RuntimeError(f"{name} not ready in {READY_WITHIN_SECONDS}s:\n{started.log()}")
            time.sleep(POLL_SECONDS)
        return time.monotonic() - started_at
    finally:
        procs.stop(started)
        procs.started.remove(started)


@dataclass(frozen=True)
class Command:
    """One way of starting a server, and when it counts as ready."""

    argv: Callable[[dict[str, str]], list[str]]
    env: dict[str, str]
    ready: Callable[[int], bool]


def _readyz_200(port: int) -> bool:
    return _answer(port, "/readyz") == 200


def _answers(port: int) -> bool:
    return _answer(port, "/readyz") is not None


def commands(redis_port: int) -> dict[str, Command]:
    """bare, memory and redis: what the rows compare."""
    quiesce = [str(BIN / "quiesce"), "serve", "--host", "127.0.0.1"]
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    return {
        "bare": Command(_bare_argv, {"PYTHONPATH": _pythonpath(REPO / "bench")}, _answers),
        "memory": Command(lambda env: quiesce, {}, _readyz_200),
        "redis": Command(lambda env: quiesce, {"QUIESCE_REDIS_URL": redis_url}, _readyz_200),
    }


def measure(
    options: Options,
    repetitions: int,
    more: Callable[[int], dict[str, Command]] = lambda redis_port: {},
) -> dict[str, list[float]]:
    """Start → ready of each command, ``repetitions`` times, in rotating order.

    ``more`` adds commands to compare (given the redis-server's port).
    """
    with Processes(keep_logs=options.keep_logs) as procs:
        redis = procs.redis_server()
        assert redis.port is not None
        started = {**commands(redis.port), **more(redis.port)}
        names = list(started)
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in names:  # not measured: bytecode written, files in the page cache
            command = started[name]
            env = {**base_env(), "PORT": str(free_port()), **command.env}
            _time_to_ready(procs, f"{name}-warm-up", command.argv(env), env, command.ready)
        for repetition in range(repetitions):
            shift = repetition % len(names)
            for name in names[shift:] + names[:shift]:
                command = started[name]
                env = {**base_env(), "PORT": str(free_port()), **command.env}
                elapsed = _time_to_ready(
                    procs, f"{name}-{repetition}", command.argv(env), env, command.ready
                )
                times[name].append(elapsed)
        if options.keep_logs:
            print(f"logs: {procs.workdir}", file=sys.stderr)
        return times


def paired_ratio(times: dict[str, list[float]], name: str) -> float:
    """The median over repetitions of ``name``'s time over the bare one's.

    Each repetition starts every command one after the other, so a ratio within one
    repetition shares the machine's load of that moment (other processes come and
    go on a shared machine); the median of these is steadier than a ratio of medians.
    """
    return median([mine / bare for mine, bare in zip(times[name], times["bare"], strict=True)])


def rows(times: dict[str, list[float]], *, smoke: bool) -> list[Row]:
    bare = median(times["bare"])
    result = []
    for name, label in (("memory", "memory store"), ("redis", "Redis store")):
        ratio = paired_ratio(times, name)
        result.append(
            Row(
                goal=f"cold start, {label} (start → ready)",
                measured=f"{median(times[name]):.2f} s",
                reference=f"bare {bare:.2f} s",
                ratio=ratio,
                target=f"≤ {TARGET_RATIO:.2f}",
                met=None if smoke else ratio <= TARGET_RATIO,
            )
        )
    return result


def run(options: Options) -> list[Row]:
    """The section's rows (what ``bench/perf.py`` calls)."""
    repetitions = SMOKE_REPETITIONS if options.smoke else REPETITIONS
    return rows(measure(options, repetitions), smoke=options.smoke)


def checkout_commands(checkout: Path) -> Callable[[int], dict[str, Command]]:
    """``quiesce serve`` of another checkout (e.g. ``git archive REV | tar -x -C DIR``),
    memory and Redis, run by the same interpreter: a before/after in one run."""

    def more(redis_port: int) -> dict[str, Command]:
        quiesce = [str(BIN / "quiesce"), "serve", "--host", "127.0.0.1"]
        env = {"PYTHONPATH": _pythonpath(checkout)}
        redis = {**env, "QUIESCE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
        return {
            f"memory @ {checkout.name}": Command(lambda env: quiesce, env, _readyz_200),
            f"redis @ {checkout.name}": Command(lambda env: quiesce, redis, _readyz_200),
        }

    return more


def main() -> None:
    parser = section_parser(__doc__, "two repetitions, not judged")
    parser.add_argument("--repetitions", type=int, default=None)
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        metavar="DIR",
        help="also start another checkout's quiesce serve (memory and Redis) in the same run",
    )
    args = parser.parse_args()
    options = options_from(args)
    repetitions = args.repetitions or (SMOKE_REPETITIONS if args.smoke else REPETITIONS)
    more = checkout_commands(args.compare_with.resolve()) if args.compare_with else None
    times = measure(options, repetitions, more) if more else measure(options, repetitions)
    for name, values in times.items():
        print(
            f"{name}: median {median(values):.3f} s, {paired_ratio(times, name):.2f}x bare "
            f"[{', '.join(f'{value:.2f}' for value in values)}]",
            file=sys.stderr,
        )
    print(render(rows(times, smoke=options.smoke)))


if __name__ == "__main__":
    main()
