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

import msgspec
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
    """Our events through structlog's own (fast) loggers, and the standard library's
    records through a formatter with the same processors, both to stderr."""
    fmt = _resolve(log_format)
    structlog.configure(
        processors=[*_shared_processors(fmt), _renderer(fmt)],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_NamedWriter.factory,
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
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(fmt),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _renderer(fmt)],
    )


def granian_formatter() -> logging.Formatter:
    """Factory named by ``granian_logging.json``: Granian's own lines in our format.

    Granian's main process builds it before any settings object exists, so it reads
    the (already validated) ``QUIESCE_LOG_FORMAT`` itself.
    """
    value = os.environ.get("QUIESCE_LOG_FORMAT", "").strip()
    return stdlib_formatter("console" if value == "console" else "json" if value else None)


class _NamedWriter(structlog.WriteLogger):
    """structlog's plain stderr writer, carrying the name ``get_logger(__name__)`` gave
    it, so ``add_logger_name`` works as for standard-library loggers."""

    def __init__(self, name: str) -> None:
        super().__init__(sys.stderr)
        self.name = name

    @classmethod
    def factory(cls, *args: Any) -> _NamedWriter:
        return cls(str(args[0]) if args else "")


def _resolve(log_format: LogFormat | None) -> LogFormat:
    return log_format or ("console" if sys.stderr.isatty() else "json")


def _renderer(fmt: LogFormat) -> Any:
    if fmt == "json":
        return structlog.processors.JSONRenderer(serializer=_json_dumps)
    return structlog.dev.ConsoleRenderer()


def _json_dumps(event: Any, **_: Any) -> str:
    return _json.encode(event).decode()


#: msgspec renders a line several times faster than the json module; anything it
#: does not know is logged as its str().
_json: Final = msgspec.json.Encoder(enc_hook=str)


def _shared_processors(fmt: LogFormat) -> list[Any]:
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask_sensitive,
    ]
    if fmt == "json":
        processors.append(structlog.processors.dict_tracebacks)
    return processors
