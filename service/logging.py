"""Logging, configured once per process: structlog for our events, and the standard
library's records (Granian, Litestar, httpx) rendered by the same formatter, so a pod
writes one format — JSON lines when stderr is not a terminal.

``run_id`` and ``task`` are bound with contextvars while a run executes (see the
scheduler). Request bodies, headers and tokens are never logged; as a second line of
defence, values under sensitive key names are masked.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

from service.config import LogFormat

_SENSITIVE_KEYS: Final = frozenset(
    {"authorization", "api_token", "token", "secret", "password", "input", "body", "headers"}
)
_QUIET_LOGGERS: Final = ("httpx", "httpcore")


def _mask_sensitive(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in _SENSITIVE_KEYS.intersection(event):
        event[key] = "[masked]"
    return event


def configure_logging(log_format: LogFormat | None, *, level: int = logging.INFO) -> None:
    """Route structlog and stdlib logging through one renderer on stderr."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(_resolve(log_format)),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached, so structlog.testing.capture_logs sees every logger in tests.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(stdlib_formatter(log_format))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def stdlib_formatter(log_format: LogFormat | None) -> logging.Formatter:
    """A formatter that renders standard-library records like our own events."""
    fmt = _resolve(log_format)
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(fmt),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )


def granian_formatter() -> logging.Formatter:
    """Factory named by ``granian_logging.json``: Granian's own lines in our format.

    Granian's main process builds it before any settings object exists, so it reads
    the (already validated) ``QUIESCE_LOG_FORMAT`` itself.
    """
    value = os.environ.get("QUIESCE_LOG_FORMAT", "").strip()
    return stdlib_formatter("console" if value == "console" else "json" if value else None)


def _resolve(log_format: LogFormat | None) -> LogFormat:
    return log_format or ("console" if sys.stderr.isatty() else "json")


def _shared_processors(fmt: LogFormat) -> list[Any]:
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask_sensitive,
    ]
    if fmt == "json":
        processors.append(structlog.processors.dict_tracebacks)
    return processors
