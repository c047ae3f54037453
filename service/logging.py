"""Logging, configured once per process: structlog for our events, and the standard
library's records (Granian, Litestar, httpx) rendered by the same formatter, so a pod
writes one format — JSON lines when stderr is not a terminal.

``run_id`` and ``task`` are bound with contextvars while a run executes (see the
scheduler). Request bodies, headers and tokens are never logged; as a second line of
defence, values under sensitive key names are masked.
"""

from __future__ import annotations

import logging
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
    fmt = log_format or ("console" if sys.stderr.isatty() else "json")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask_sensitive,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.dict_tracebacks)
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached, so structlog.testing.capture_logs sees every logger in tests.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
