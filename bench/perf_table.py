"""The one table ``bench/perf.py`` prints: what every section of the performance bench
returns, and how it is rendered.

A section is a module ``bench/perf_<name>.py`` with ``run(options) -> list[Row]``. It
starts what it measures and its reference side by side (its own ``redis-server``, its
own servers, through :class:`support.Processes`), measures both in the same run, and
returns one row per goal. Ratios, not absolute figures, are what a shared machine can
compare.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """What every section is given."""

    #: Seconds instead of minutes: only proves the section runs and fills its rows.
    smoke: bool = False
    #: Keep the servers' logs (the path is printed).
    keep_logs: bool = False


@dataclass(frozen=True)
class Row:
    """One goal: what was measured, against what, and whether the target is met."""

    goal: str  # e.g. "create, 64 connections"
    measured: str  # e.g. "7,912 req/s, p99 14 ms"
    reference: str  # e.g. "bare endpoint 10,840 req/s, p99 9 ms"
    ratio: float | None  # measured / reference, in the direction the target states
    target: str  # e.g. "≥ 0.70"
    met: bool | None  # None: not judged (e.g. in a smoke run)


def render(rows: list[Row]) -> str:
    """The markdown table."""
    lines = [
        "| goal | measured | reference | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}"
        met = {True: "yes", False: "**no**", None: "—"}[row.met]
        lines.append(
            f"| {row.goal} | {row.measured} | {row.reference} | {ratio} | {row.target} | {met} |"
        )
    return "\n".join(lines)


def section_parser(doc: str | None, smoke_help: str) -> argparse.ArgumentParser:
    """The command line of a section run alone: ``--smoke`` and ``--keep-logs`` (a
    section adds its own options)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    return Options(smoke=args.smoke, keep_logs=args.keep_logs)
