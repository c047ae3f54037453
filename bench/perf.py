"""The performance bench: every section, one markdown table of ratios.

Each section is a module ``bench/perf_<name>.py`` with ``run(options) -> list[Row]``
(see ``perf_table.py``); it starts what it measures and its reference side by side
and returns one row per goal. The sections run in the order of ``SECTIONS``; one
whose module does not exist is skipped with a note. A section that raises is named
and the command exits 1, after printing the rows of the others.

Usage: .venv/bin/python bench/perf.py [--smoke] [--only NAME ...] [--keep-logs]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shlex
import shutil
import sys
import time
import traceback

from perf_table import Options, Row, render

#: Every section, in the order they run.
SECTIONS = ("create", "peers", "events", "fanout", "runs", "start")
#: The sections that drive their servers with wrk.
WRK_SECTIONS = frozenset({"create", "peers"})
EXIT_SECTION_FAILED = 1
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds instead of minutes: proves every section runs and fills its rows "
        "(the rows are not judged)",
    )
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, metavar="NAME", help=f"among {', '.join(SECTIONS)}"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args(argv)
    names = args.only or SECTIONS
    tools = ["redis-server", *(["wrk"] if WRK_SECTIONS.intersection(names) else [])]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        print(f"not on PATH: {', '.join(missing)} (Debian: apt-get install -y {' '.join(missing)})")
        return EXIT_USAGE
    options = Options(smoke=args.smoke, keep_logs=args.keep_logs)
    started = datetime.datetime.now(datetime.UTC)
    rows: list[Row] = []
    failed: list[str] = []
    for name in names:
        try:
            module = importlib.import_module(f"perf_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"perf_{name}":
                raise
            print(f"section {name}: bench/perf_{name}.py does not exist here, skipped")
            continue
        print(f"section {name}: running", flush=True)
        began = time.monotonic()
        try:
            section_rows = module.run(options)
        except Exception:
            traceback.print_exc(file=sys.stdout)
            print(f"section {name}: FAILED (above)", flush=True)
            failed.append(name)
            continue
        rows.extend(section_rows)
        print(
            f"section {name}: {len(section_rows)} row{'s' * (len(section_rows) != 1)} "
            f"in {time.monotonic() - began:.0f} s",
            flush=True,
        )
    print()
    print(render(rows))
    print()
    print(f"Date: {started:%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores")
    print(f"Command: {shlex.join([interpreter(), *sys.argv])}")
    if options.smoke:
        print("Smoke run: seconds per server, the rows are not judged.")
    if failed:
        print(f"Sections that failed: {', '.join(failed)}")
        return EXIT_SECTION_FAILED
    return 0


def interpreter() -> str:
    """This Python, relative to the working directory when it lies below it."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


if __name__ == "__main__":
    sys.exit(main())
