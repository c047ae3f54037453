"""Settings: a pure function of the environment, validated once at start.

Every variable of the contract is read here and nowhere else. A bad value raises
:class:`ConfigError` whose message is one line naming the variable, which the CLI
prints before exiting with status 2 — a pod with a typo in its manifest should
say so in its first log line, not fail later in a request.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from service.webhooks import decode_secret

LogFormat = Literal["json", "console"]
#: How the Redis URL is used: ``auto`` asks the server (``INFO cluster``) at start.
RedisMode = Literal["auto", "standalone", "cluster", "sentinel"]
_REDIS_MODES: tuple[RedisMode, ...] = ("auto", "standalone", "cluster", "sentinel")

_WORKER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_HOSTNAME_RE = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
#: What leaving a signing secret unset means, for the error on an empty one.
_SIGNING_UNSET = {
    "QUIESCE_CALLBACK_SECRET": "send callbacks unsigned",
    "QUIESCE_WEBHOOK_SECRET": "accept creates without a signature",
}


class ConfigError(ValueError):
    """A variable of the environment has a value the service cannot run with."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The validated configuration of one process (see README, "Configuration")."""

    port: int = 8000
    redis_url: str | None = None
    redis_mode: RedisMode = "auto"
    shutdown_grace_seconds: float = 25.0
    max_active_runs: int = 100
    run_timeout_seconds: float = 3600.0
    run_retention_seconds: int = 86400
    api_token: str | None = None
    worker_id: str = "quiesce"
    task_modules: tuple[str, ...] = ()
    http_allowed_hosts: tuple[str, ...] = ()
    #: ``None`` means "json when stderr is not a terminal"; decided by service.logging.
    log_format: LogFormat | None = None
    lease_ttl_seconds: float = 15.0
    callback_secret: str | None = None
    webhook_secret: str | None = None
    max_streams: int = 2000
    request_body_timeout_seconds: float = 10.0
    #: How deeply a create body's JSON may nest; deeper bodies are refused (400)
    #: before they are decoded, so a hostile body cannot exhaust the decoder's stack.
    max_json_depth: int = 64

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read and validate every variable; raise ConfigError naming the first bad one."""
        env = _Env(environ)
        return cls(
            port=env.integer("PORT", 8000, minimum=1, maximum=65535),
            redis_url=env.redis_url(),
            redis_mode=env.redis_mode(),
            shutdown_grace_seconds=env.number("QUIESCE_SHUTDOWN_GRACE_SECONDS", 25.0, minimum=0),
            max_active_runs=env.integer("QUIESCE_MAX_ACTIVE_RUNS", 100, minimum=1),
            run_timeout_seconds=env.number(
                "QUIESCE_RUN_TIMEOUT_SECONDS", 3600.0, minimum=0, exclusive=True
            ),
            run_retention_seconds=env.integer("QUIESCE_RUN_RETENTION_SECONDS", 86400, minimum=60),
            api_token=env.secret("QUIESCE_API_TOKEN"),
            worker_id=env.worker_id(),
            task_modules=env.modules("QUIESCE_TASK_MODULES"),
            http_allowed_hosts=env.hosts("QUIESCE_HTTP_ALLOWED_HOSTS"),
            log_format=env.log_format(),
            lease_ttl_seconds=env.number("QUIESCE_LEASE_TTL_SECONDS", 15.0, minimum=3),
            callback_secret=env.signing_secret("QUIESCE_CALLBACK_SECRET"),
            webhook_secret=env.signing_secret("QUIESCE_WEBHOOK_SECRET"),
            max_streams=env.integer("QUIESCE_MAX_STREAMS", 2000, minimum=1, maximum=100_000),
            request_body_timeout_seconds=env.number(
                "QUIESCE_REQUEST_BODY_TIMEOUT_SECONDS", 10.0, minimum=0, exclusive=True
            ),
            max_json_depth=env.integer("QUIESCE_MAX_JSON_DEPTH", 64, minimum=2, maximum=256),
        )


class _Env:
    """Typed readers over the environment; each error names its variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = int(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a whole number, got {value!r}") from None
        if parsed < minimum or (maximum is not None and parsed > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(f"{name}: must be {bounds}, got {parsed}")
        return parsed

    def number(
        self, name: str, default: float, *, minimum: float, exclusive: bool = False
    ) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number of seconds, got {value!r}") from None
        if parsed != parsed or parsed in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        if parsed < minimum or (exclusive and parsed == minimum):
            relation = ">" if exclusive else ">="
            raise ConfigError(f"{name}: must be {relation} {minimum:g}, got {value}")
        return parsed

    def set_value(self, name: str, *, when_unset: str) -> str | None:
        """None when ``name`` is absent; an explicitly empty (or blank) value is refused.

        For a secret or the store's URL, "unset" changes how the service behaves
        (loopback-only auth, unsigned callbacks, a store that lives in one process),
        and an empty value is nearly always a Secret key or a template that failed to
        render — so it stops the start instead of silently meaning "unset".
        """
        value = self._environ.get(name)
        if value is None:
            return None
        if value.strip() == "":
            raise ConfigError(f"{name}: is set but empty; unset it to {when_unset}")
        return value.strip()

    def secret(self, name: str) -> str | None:
        # The value is never echoed: a misconfigured secret must not reach the logs.
        value = self.set_value(name, when_unset="serve loopback clients only")
        if value is not None and len(value) < 16:
            raise ConfigError(f"{name}: must be at least 16 characters long")
        return value

    def signing_secret(self, name: str) -> str | None:
        """A Standard Webhooks secret: ``whsec_`` and a base64 key of 16 bytes or more."""
        value = self.set_value(name, when_unset=_SIGNING_UNSET[name])
        if value is not None:
            try:
                decode_secret(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        return value

    def redis_url(self) -> str | None:
        for name in ("QUIESCE_REDIS_URL", "REDIS_URL"):
            value = self.set_value(name, when_unset="use the in-memory store")
            if value is None:
                continue
            scheme = urlsplit(value).scheme
            if scheme not in _REDIS_SCHEMES:
                raise ConfigError(
                    f"{name}: expected a redis://, rediss:// or unix:// URL, got scheme {scheme!r}"
                )
            return value
        return None

    def redis_mode(self) -> RedisMode:
        value = self.raw("QUIESCE_REDIS_MODE")
        if value is None:
            return "auto"
        for mode in _REDIS_MODES:
            if value.strip().lower() == mode:
                return mode
        raise ConfigError(
            f"QUIESCE_REDIS_MODE: expected one of {', '.join(_REDIS_MODES)}, got {value!r}"
        )

    def worker_id(self) -> str:
        value = self.raw("QUIESCE_WORKER_ID") or socket.gethostname()
        if not _WORKER_ID_RE.match(value):
            raise ConfigError(
                "QUIESCE_WORKER_ID: use letters, digits, '.', '_' or '-' (at most 253), "
                f"got {value!r}"
            )
        return value

    def modules(self, name: str) -> tuple[str, ...]:
        items = _split_list(self.raw(name))
        for item in items:
            if not _MODULE_RE.match(item):
                raise ConfigError(f"{name}: {item!r} is not a dotted module name")
        return items

    def hosts(self, name: str) -> tuple[str, ...]:
        items = tuple(item.lower() for item in _split_list(self.raw(name)))
        for item in items:
            if not _is_host_pattern(item):
                raise ConfigError(
                    f"{name}: {item!r} is not a hostname, '*.domain', IP address or CIDR block"
                )
        return items

    def log_format(self) -> LogFormat | None:
        value = self.raw("QUIESCE_LOG_FORMAT")
        if value is None:
            return None
        if value == "json":
            return "json"
        if value == "console":
            return "console"
        raise ConfigError(f"QUIESCE_LOG_FORMAT: expected 'json' or 'console', got {value!r}")


def _split_list(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _is_host_pattern(item: str) -> bool:
    try:
        ipaddress.ip_network(item, strict=False)
    except ValueError:
        return bool(_HOSTNAME_RE.match(item))
    return True
