"""Logging, configured once per process: structlog for our events, and the standard
library's records (Granian, Litestar, httpx) rendered by the same formatter, so a pod
writes one format — JSON lines when stderr is not a terminal.

``run_id`` and ``task`` are bound with contextvars while a run executes (see the
scheduler). Request bodies, headers, inputs and tokens are never logged. Three
defences keep them out of a line even by accident:

* an exception is rendered as its type, its message and its frames (file, line,
  function) — never a frame's local variables, which is where an ``http`` task holds
  its request headers and body (structlog's ``dict_tracebacks`` and the Rich console
  traceback both show locals by default);
* values under sensitive key names are masked;
* every configured secret (the API token, the signing secrets, the Redis password,
  the sentinels' password)
  is replaced by ``[redacted]`` in the finished line, in each form it could be
  printed in. This last step runs on the rendered text, so it covers messages,
  tracebacks and third-party records alike.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote, urlsplit

import msgspec
import structlog
from structlog.tracebacks import ExceptionDictTransformer

from service.config import LogFormat, Settings

_SENSITIVE_KEYS: Final = frozenset(
    {"authorization", "api_token", "token", "secret", "password", "input", "body", "headers"}
)
_QUIET_LOGGERS: Final = ("httpx", "httpcore")
#: What a secret is replaced with in a rendered line.
REDACTED: Final = "[redacted]"
#: Variables holding a bearer token or password, redacted as written.
TOKEN_VARIABLES: Final = ("QUIESCE_API_TOKEN", "QUIESCE_REDIS_SENTINEL_PASSWORD")
#: Variables holding a Standard Webhooks secret (``whsec_<base64 key>``).
SIGNING_SECRET_VARIABLES: Final = ("QUIESCE_WEBHOOK_SECRET", "QUIESCE_CALLBACK_SECRET")
REDIS_URL_VARIABLES: Final = ("QUIESCE_REDIS_URL", "REDIS_URL")
#: Shorter forms are not redacted: replacing a common word everywhere would garble
#: the logs and hide nothing (every secret the service accepts is 16 characters or more).
MIN_REDACTED_LENGTH: Final = 8


def configure_logging(
    log_format: LogFormat | None,
    *,
    redactor: Redactor | None = None,
    level: int = logging.INFO,
) -> None:
    """Our events through structlog's own (fast) loggers, and the standard library's
    records through a formatter with the same processors, both to stderr."""
    fmt = _resolve(log_format)
    # Loggers are cached on first use: otherwise every call builds a new bound logger
    # (a few µs per line). A cached logger keeps the processors list it was built
    # with, so that list is changed in place here, never replaced — which is also how
    # ``structlog.testing.capture_logs`` swaps processors under cached loggers.
    processors = structlog.get_config()["processors"]
    processors[:] = [*_shared_processors(fmt), *_final_processors(fmt, redactor)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_NamedWriter.factory,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(stdlib_formatter(log_format, redactor=redactor))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def stdlib_formatter(
    log_format: LogFormat | None, *, redactor: Redactor | None = None
) -> logging.Formatter:
    """A formatter that renders standard-library records like our own events."""
    fmt = _resolve(log_format)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(fmt),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_final_processors(fmt, redactor),
        ],
    )


def granian_formatter() -> logging.Formatter:
    """Factory named by ``granian_logging.json``: Granian's own lines in our format.

    Granian's main process builds it before any settings object exists, so it reads
    ``QUIESCE_LOG_FORMAT`` and the secrets from the environment itself.
    """
    value = os.environ.get("QUIESCE_LOG_FORMAT", "").strip()
    fmt: LogFormat | None = "console" if value == "console" else "json" if value else None
    return stdlib_formatter(fmt, redactor=Redactor.from_env(os.environ))


class Redactor:
    """Replaces each configured secret in a rendered line by ``[redacted]``.

    A secret is looked for in every form in which it could plausibly be printed: as
    written, JSON-escaped, ``repr``-escaped, percent-encoded, and for a signing
    secret also its base64 key (with and without padding, URL-safe) and that key in
    hex. A substring test per form is cheaper than one regular expression over all of
    them (about 1 µs per line for three secrets), and there is no cost at all when no
    secret is configured (no redactor is installed).
    """

    def __init__(self, forms: Iterable[str]) -> None:
        # Longest first: a form that contains another is replaced whole.
        self._forms = tuple(
            sorted({f for f in forms if len(f) >= MIN_REDACTED_LENGTH}, key=len, reverse=True)
        )

    @classmethod
    def of(
        cls,
        *,
        tokens: Iterable[str | None] = (),
        signing_secrets: Iterable[str | None] = (),
        redis_url: str | None = None,
    ) -> Redactor | None:
        """A redactor for these secrets; None when there is nothing to redact."""
        forms: set[str] = set()
        for token in tokens:
            if token:
                forms |= _printed_forms(token)
        for secret in signing_secrets:
            if secret:
                forms |= _printed_forms(secret)
                for key_text in _key_texts(secret):
                    forms |= _printed_forms(key_text)
        password = _redis_password(redis_url)
        if password:
            forms |= _printed_forms(password)
        redactor = cls(forms)
        return redactor if redactor._forms else None

    @classmethod
    def for_settings(cls, settings: Settings) -> Redactor | None:
        return cls.of(
            tokens=[settings.api_token, settings.redis_sentinel_password],
            signing_secrets=[settings.webhook_secret, settings.callback_secret],
            redis_url=settings.redis_url,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Redactor | None:
        """The same secrets, read leniently (a bad value is refused elsewhere, by
        Settings; here every value that is set is simply redacted)."""

        def values(names: Iterable[str]) -> list[str]:
            return [v.strip() for name in names if (v := environ.get(name, "")).strip()]

        urls = values(REDIS_URL_VARIABLES)
        return cls.of(
            tokens=values(TOKEN_VARIABLES),
            signing_secrets=values(SIGNING_SECRET_VARIABLES),
            redis_url=urls[0] if urls else None,
        )

    def __call__(self, _: Any, __: str, line: Any) -> Any:
        """The last processor: it receives the rendered line."""
        if isinstance(line, str):
            for form in self._forms:
                if form in line:
                    line = line.replace(form, REDACTED)
        return line


def _printed_forms(value: str) -> set[str]:
    """``value`` as a log line could carry it: raw, inside a JSON string, inside a
    Python repr (the console renderer), and percent-encoded (in a URL)."""
    return {
        value,
        _json.encode(value).decode()[1:-1],
        repr(value)[1:-1],
        quote(value, safe=""),
        quote(value, safe="/"),
    }


def _key_texts(secret: str) -> set[str]:
    """The base64 text of a ``whsec_`` secret and other spellings of its key."""
    text = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return {text}
    return {
        text,
        text.rstrip("="),
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode().rstrip("="),
        key.hex(),
    }


def _redis_password(url: str | None) -> str | None:
    if not url:
        return None
    if "+sentinel://" in url:
        # Several hosts: urlsplit cannot read it, the sentinel parser can.
        from service.config import parse_sentinel_url

        try:
            return parse_sentinel_url(url).password
        except ValueError:
            return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


class _NamedWriter:
    """A line writer to stderr carrying the name ``get_logger(__name__)`` gave it, so
    ``add_logger_name`` works as for standard-library loggers.

    ``sys.stderr`` is looked up at each write, not kept: loggers are cached, and
    whatever replaced stderr since (a test's capture) must receive the line.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def factory(cls, *args: Any) -> _NamedWriter:
        return cls(str(args[0]) if args else "")

    def msg(self, message: str) -> None:
        with _WRITE_LOCK:
            stream = sys.stderr
            stream.write(message + "\n")
            stream.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_WRITE_LOCK: Final = threading.Lock()


class _UtcTimestamp:
    """``timestamp``: the time in UTC as RFC 3339 with microseconds, ``...T17:23:36.587021Z``.

    The date and time of day are formatted once per second; each line only adds its
    microseconds (structlog's TimeStamper formats a datetime per line).
    """

    __slots__ = ("_formatted",)

    def __init__(self) -> None:
        #: (second, its date and time of day), replaced as one (threads may log too).
        self._formatted: tuple[int, str] = (-1, "")

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second, prefix = self._formatted
        if int(now) != second:
            second = int(now)
            prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._formatted = (second, prefix)
        event["timestamp"] = f"{prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


def _resolve(log_format: LogFormat | None) -> LogFormat:
    return log_format or ("console" if sys.stderr.isatty() else "json")


def _mask_sensitive(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in _SENSITIVE_KEYS.intersection(event):
        event[key] = "[masked]"
    return event


def _final_processors(fmt: LogFormat, redactor: Redactor | None) -> list[Any]:
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps)
    else:
        # Rich's traceback (the default when it is installed) prints locals.
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    return [renderer] if redactor is None else [renderer, redactor]


def _json_dumps(event: Any, **_: Any) -> str:
    return _json.encode(event).decode()


#: msgspec renders a line several times faster than the json module; anything it
#: does not know is logged as its str().
_json: Final = msgspec.json.Encoder(enc_hook=str)

#: Type, message and frames (file, line, function) of each exception in the chain;
#: never the frames' locals.
_exception_to_dicts: Final = structlog.processors.ExceptionRenderer(
    ExceptionDictTransformer(show_locals=False, use_rich=False)
)


def _shared_processors(fmt: LogFormat) -> list[Any]:
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        _UtcTimestamp(),
        _mask_sensitive,
    ]
    if fmt == "json":
        processors.append(_exception_to_dicts)
    return processors
