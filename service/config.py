"""Settings: a pure function of the environment, validated once at start.

Every variable of the contract is read here and nowhere else. A bad value raises
:class:`ConfigError` whose message is one line naming the variable, which the CLI
prints before exiting with status 2 — a pod with a typo in its manifest should
say so in its first log line, not fail later in a request.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from service.webhooks import decode_secret

LogFormat = Literal["json", "console"]
#: How the Redis URL is used: ``auto`` asks the server (``INFO cluster``) at start.
RedisMode = Literal["auto", "standalone", "cluster", "sentinel"]
_REDIS_MODES: tuple[RedisMode, ...] = ("auto", "standalone", "cluster", "sentinel")
#: The event loop Granian's worker runs: ``auto`` is uvloop when it is installed.
EventLoop = Literal["auto", "asyncio", "uvloop"]
_EVENT_LOOPS: tuple[EventLoop, ...] = ("auto", "asyncio", "uvloop")

_WORKER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_HOSTNAME_RE = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
#: A pod's name is a DNS subdomain (RFC 1123): what the API path may carry.
_POD_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
#: A namespace's name is a DNS label (RFC 1123).
_NAMESPACE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
#: Where Kubernetes mounts the pod's service-account token, cluster CA and namespace.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
#: Sentinel's own port, assumed for a sentinel address written without one.
SENTINEL_DEFAULT_PORT = 26379
#: The most WAIT may block: below the store's 2 s socket and call timeouts, so a
#: replica that does not confirm is a 503, never a dropped connection.
MAX_WAIT_TIMEOUT_SECONDS = 1.5
#: What leaving a signing secret unset means, for the error on an empty one.
_SIGNING_UNSET = {
    "QUIESCE_CALLBACK_SECRET": "send callbacks unsigned",
    "QUIESCE_WEBHOOK_SECRET": "accept creates without a signature",
}


class ConfigError(ValueError):
    """A variable of the environment has a value the service cannot run with."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PodDeletionCostSettings:
    """How this pod reaches the Kubernetes API to annotate itself (README, "Busy-aware
    scale-in"). Present only when ``QUIESCE_POD_DELETION_COST`` is on."""

    #: At most one PATCH per this many seconds (``QUIESCE_POD_DELETION_COST_INTERVAL_SECONDS``).
    interval_seconds: float = 10.0
    #: ``https://KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT``.
    api_url: str
    namespace: str
    pod_name: str
    #: Read again before every request: bound tokens are rotated by the kubelet.
    token_file: str
    ca_file: str


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
    #: Keep the pod's deletion-cost annotation in step with its active runs (off: None).
    pod_deletion_cost: PodDeletionCostSettings | None = None
    #: A drain stops runs that will be retried on ``shutdown`` at its start (another
    #: replica adopts them) instead of at the end of the grace.
    handoff_on_drain: bool = False
    #: TLS: the CA that signs the server's certificate, and the client's own
    #: certificate and key for mutual TLS (both or neither).
    redis_ca_file: str | None = None
    redis_cert_file: str | None = None
    redis_key_file: str | None = None
    #: The sentinels' own credentials (the URL's are the master's).
    redis_sentinel_username: str | None = None
    redis_sentinel_password: str | None = None
    #: Creates and terminal writes are acknowledged only once WAIT confirms this
    #: many replicas have them (0: no confirmation).
    redis_min_replicas: int = 0
    redis_wait_timeout_seconds: float = 0.5
    #: The event loop asked for (``QUIESCE_EVENT_LOOP``); :attr:`loop` is the one used.
    event_loop: EventLoop = "auto"

    @property
    def loop(self) -> Literal["asyncio", "uvloop"]:
        """The loop ``quiesce serve`` gives Granian: ``auto`` means uvloop when installed."""
        if self.event_loop == "auto":
            return "uvloop" if _uvloop_installed() else "asyncio"
        return self.event_loop

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], *, service_account_dir: str = SERVICE_ACCOUNT_DIR
    ) -> Settings:
        """Read and validate every variable; raise ConfigError naming the first bad one.

        ``service_account_dir`` is where the pod's service-account files are mounted;
        it is read only when ``QUIESCE_POD_DELETION_COST`` is on (tests point it at
        their own files).
        """
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
            pod_deletion_cost=env.pod_deletion_cost(service_account_dir),
            handoff_on_drain=env.flag("QUIESCE_HANDOFF_ON_DRAIN"),
            event_loop=env.event_loop(),
            **env.redis_topology(),
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
            if scheme in _SENTINEL_SCHEMES:
                try:
                    parse_sentinel_url(value)
                except ValueError as exc:
                    raise ConfigError(f"{name}: {exc}") from None
            elif scheme not in _REDIS_SCHEMES:
                raise ConfigError(
                    f"{name}: expected a redis://, rediss://, redis+sentinel://, "
                    f"rediss+sentinel:// or unix:// URL, got scheme {scheme!r}"
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

    def event_loop(self) -> EventLoop:
        value = self.raw("QUIESCE_EVENT_LOOP")
        if value is None:
            return "auto"
        choice = next((loop for loop in _EVENT_LOOPS if value.lower() == loop), None)
        if choice is None:
            raise ConfigError(
                f"QUIESCE_EVENT_LOOP: expected one of {', '.join(_EVENT_LOOPS)}, got {value!r}"
            )
        if choice == "uvloop" and not _uvloop_installed():
            raise ConfigError(
                "QUIESCE_EVENT_LOOP: 'uvloop' is not installed here (it does not exist for "
                "Windows); unset it to use uvloop only when it is installed"
            )
        return choice

    def redis_topology(self) -> dict[str, Any]:
        """TLS files, the sentinels' credentials and replica confirmation, checked
        against the URL they go with (a CA file for a plain redis:// URL is a mistake
        that would otherwise pass silently)."""
        url = self.redis_url()
        scheme = "" if url is None else urlsplit(url).scheme
        mode = self.redis_mode()
        if (mode == "sentinel") != (scheme in _SENTINEL_SCHEMES) and url is not None:
            if mode == "sentinel":
                raise ConfigError(
                    "QUIESCE_REDIS_MODE: sentinel needs a redis+sentinel:// or "
                    "rediss+sentinel:// URL in QUIESCE_REDIS_URL"
                )
            if mode != "auto":
                raise ConfigError(
                    f"QUIESCE_REDIS_MODE: {mode} does not go with a {scheme}:// URL "
                    "(that URL names sentinels)"
                )
        tls = scheme in ("rediss", "rediss+sentinel")
        files: dict[str, str | None] = {}
        for field_name, name in (
            ("redis_ca_file", "QUIESCE_REDIS_CA_FILE"),
            ("redis_cert_file", "QUIESCE_REDIS_CERT_FILE"),
            ("redis_key_file", "QUIESCE_REDIS_KEY_FILE"),
        ):
            path = self.raw(name)
            if path is not None:
                if not tls:
                    raise ConfigError(
                        f"{name}: set, but QUIESCE_REDIS_URL is not a rediss:// or "
                        "rediss+sentinel:// URL (TLS is off)"
                    )
                if not os.path.isfile(path) or not os.access(path, os.R_OK):
                    raise ConfigError(f"{name}: {path!r} is not a readable file")
            files[field_name] = path
        if (files["redis_cert_file"] is None) != (files["redis_key_file"] is None):
            raise ConfigError(
                "QUIESCE_REDIS_CERT_FILE: a client certificate needs its key "
                "(QUIESCE_REDIS_KEY_FILE), and the key its certificate: set both or neither"
            )
        sentinel_username = self.raw("QUIESCE_REDIS_SENTINEL_USERNAME")
        sentinel_password = self.set_value(
            "QUIESCE_REDIS_SENTINEL_PASSWORD", when_unset="connect to the sentinels without one"
        )
        if (sentinel_password or sentinel_username) and scheme not in _SENTINEL_SCHEMES:
            raise ConfigError(
                "QUIESCE_REDIS_SENTINEL_PASSWORD: set, but QUIESCE_REDIS_URL does not name "
                "sentinels (redis+sentinel://)"
            )
        min_replicas = self.integer("QUIESCE_REDIS_MIN_REPLICAS", 0, minimum=0, maximum=100)
        if min_replicas and url is None:
            raise ConfigError("QUIESCE_REDIS_MIN_REPLICAS: needs QUIESCE_REDIS_URL (a Redis)")
        wait_timeout = self.number(
            "QUIESCE_REDIS_WAIT_TIMEOUT_SECONDS", 0.5, minimum=0, exclusive=True
        )
        if wait_timeout > MAX_WAIT_TIMEOUT_SECONDS:
            raise ConfigError(
                f"QUIESCE_REDIS_WAIT_TIMEOUT_SECONDS: must be <= {MAX_WAIT_TIMEOUT_SECONDS:g} "
                f"(below the store's call timeout), got {wait_timeout:g}"
            )
        return {
            **files,
            "redis_sentinel_username": sentinel_username,
            "redis_sentinel_password": sentinel_password,
            "redis_min_replicas": min_replicas,
            "redis_wait_timeout_seconds": wait_timeout,
        }

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

    def flag(self, name: str) -> bool:
        """``true`` or ``false`` (any case); unset is false."""
        value = self.raw(name)
        if value is None:
            return False
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{name}: expected 'true' or 'false', got {value!r}")

    def pod_deletion_cost(self, service_account_dir: str) -> PodDeletionCostSettings | None:
        interval = self.number("QUIESCE_POD_DELETION_COST_INTERVAL_SECONDS", 10.0, minimum=1)
        if not self.flag("QUIESCE_POD_DELETION_COST"):
            return None
        return _in_cluster(interval, self._environ, service_account_dir)


def _in_cluster(
    interval: float, environ: Mapping[str, str], sa_dir: str
) -> PodDeletionCostSettings:
    """The in-cluster API's address, this pod's name and namespace, and the mounted
    credentials — checked now, because the operator asked for the feature: a pod that
    cannot reach the API says so in its first log line instead of failing every PATCH."""
    name = "QUIESCE_POD_DELETION_COST"
    host = (environ.get("KUBERNETES_SERVICE_HOST") or "").strip()
    port = (environ.get("KUBERNETES_SERVICE_PORT") or "").strip()
    if not host or not port:
        raise ConfigError(
            f"{name}: KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set "
            "(not running in a Kubernetes pod); unset it to run without it"
        )
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{name}: KUBERNETES_SERVICE_PORT is not a port, got {port!r}")
    pod_name = (environ.get("POD_NAME") or environ.get("QUIESCE_WORKER_ID") or "").strip()
    if not _POD_NAME_RE.match(pod_name):
        raise ConfigError(
            f"{name}: needs the pod's name in POD_NAME (or QUIESCE_WORKER_ID) from the "
            f"downward API (fieldPath: metadata.name), got {pod_name!r}"
        )
    files = {part: os.path.join(sa_dir, part) for part in ("token", "ca.crt", "namespace")}
    for part, path in files.items():
        if not os.path.isfile(path):
            raise ConfigError(
                f"{name}: no service-account {part} at {path} "
                "(mount the token: automountServiceAccountToken: true)"
            )
    try:
        with open(files["namespace"], encoding="utf-8") as namespace_file:
            namespace = namespace_file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read {files['namespace']}: {exc}") from None
    if not _NAMESPACE_RE.match(namespace):
        raise ConfigError(f"{name}: {files['namespace']} holds no namespace name")
    api_host = f"[{host}]" if ":" in host else host
    return PodDeletionCostSettings(
        interval_seconds=interval,
        api_url=f"https://{api_host}:{port}",
        namespace=namespace,
        pod_name=pod_name,
        token_file=files["token"],
        ca_file=files["ca.crt"],
    )


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """``redis+sentinel://[user:password@]host1:26379,host2/<master>[/<db>]``, parsed.

    The credentials are the master's (and its replicas'); the sentinels' own are
    separate variables, since they are often different (or none).
    """

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a sentinel URL; a ValueError says what is wrong (never the password)."""
    scheme, _, rest = url.partition("://")
    if scheme not in _SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL (scheme {scheme!r})")
    netloc, _, path = rest.partition("/")
    netloc = netloc.split("?", 1)[0]
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, port = _host_port(item.strip())
        sentinels.append((host, port))
    path = path.split("?", 1)[0].strip("/")
    parts = path.split("/") if path else []
    if not parts or not parts[0]:
        raise ValueError("the URL names no master: add /<master-name> after the sentinels")
    if len(parts) > 2:
        raise ValueError("expected /<master-name>[/<db>] after the sentinels")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"the database must be a whole number, got {parts[1]!r}")
        db = int(parts[1])
    return SentinelUrl(
        sentinels=tuple(sentinels),
        master_name=unquote(parts[0]),
        db=db,
        username=username,
        password=password,
        tls=scheme == "rediss+sentinel",
    )


def _host_port(item: str) -> tuple[str, int]:
    if not item:
        raise ValueError("a sentinel address is empty (two commas, or none at all?)")
    if item.startswith("["):
        host, bracket, tail = item[1:].partition("]")
        if not bracket:
            raise ValueError(f"the sentinel address {item!r} lacks its closing ']'")
        port_text = tail.removeprefix(":") if tail.startswith(":") else None
        if tail and port_text is None:
            raise ValueError(f"the sentinel address {item!r} is not [host]:port")
    else:
        host, colon, port_text_raw = item.rpartition(":")
        if not colon:
            host, port_text = item, None
        else:
            port_text = port_text_raw
    if not host:
        raise ValueError(f"the sentinel address {item!r} has no host")
    if port_text is None:
        return host, SENTINEL_DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"the sentinel address {item!r} has a bad port {port_text!r}")
    return host, int(port_text)


def _uvloop_installed() -> bool:
    """Whether uvloop can be imported (found, not imported: start-up stays cheap)."""
    return importlib.util.find_spec("uvloop") is not None


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
