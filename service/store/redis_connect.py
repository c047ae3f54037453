"""From settings to Redis clients: standalone or Sentinel-managed, with TLS or without.

The store needs two kinds of client — a bounded, blocking pool for its pipelines and
a small one for its Pub/Sub connection — and both must reach the *current* master.
For a standalone server that is a fixed address. Under Sentinel it is whatever the
sentinels say at the moment a connection is made: redis-py's sentinel pool asks them
on every (re)connect, and a connection that finds itself on a demoted master (a
``READONLY`` reply) drops itself, so after a failover the next connection goes to
the promoted replica. The store therefore follows a failover by reconnecting, which
it does anyway after any dropped connection; until the sentinels have promoted a
replica the store is unavailable (503 + Retry-After), never wrong.

TLS (``rediss://``, ``rediss+sentinel://``): the server's certificate is verified
against ``QUIESCE_REDIS_CA_FILE`` (the system's CAs when unset) and its host name
checked; a client certificate and key are sent for mutual TLS. Under Sentinel the
connections to the sentinels use the same TLS settings as those to the master.
:func:`ssl_kwargs` is the one place these settings become redis-py arguments, so
other clients (the cluster client) use exactly the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from service.config import Settings, parse_sentinel_url
from service.store.redis_server import Topology, replication_nodes

Kind = Literal["standalone", "sentinel"]


def ssl_kwargs(settings: Settings) -> dict[str, Any]:
    """The redis-py ``ssl_*`` arguments for these settings (empty when TLS is off)."""
    url = settings.redis_url or ""
    if not url.startswith(("rediss://", "rediss+sentinel://")):
        return {}
    kwargs: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if settings.redis_ca_file is not None:
        kwargs["ssl_ca_certs"] = settings.redis_ca_file
    if settings.redis_cert_file is not None:
        kwargs["ssl_certfile"] = settings.redis_cert_file
        kwargs["ssl_keyfile"] = settings.redis_key_file
    return kwargs


class SentinelBlockingConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """A sentinel-managed pool that makes callers wait for a free connection.

    redis-py's sentinel pool raises "Too many connections" past its size, which a
    burst turns into errors; the store bounds its connections and queues instead,
    exactly as with a standalone server.
    """


@dataclass
class RedisConnector:
    """Builds the store's clients for one URL; owns the sentinel clients, if any."""

    url: str
    topology: Kind
    tls: bool
    ssl: dict[str, Any]
    sentinel: Sentinel | None = None
    master_name: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisConnector:
        """For a plain URL with no other settings (tests, tools)."""
        return cls.from_settings(Settings(redis_url=url))

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisConnector:
        url = settings.redis_url
        if url is None:
            raise ValueError("no Redis URL is configured")
        ssl = ssl_kwargs(settings)
        if not url.startswith(("redis+sentinel://", "rediss+sentinel://")):
            return cls(url=url, topology="standalone", tls=url.startswith("rediss://"), ssl=ssl)
        parsed = parse_sentinel_url(url)
        tls_kwargs: dict[str, Any] = {"ssl": True, **ssl} if parsed.tls else {}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(parsed.sentinels),
            sentinel_kwargs={
                "username": settings.redis_sentinel_username,
                "password": settings.redis_sentinel_password,
                "socket_timeout": 1.0,
                "socket_connect_timeout": 1.0,
                # No retry of one sentinel: the next one is asked instead (redis-py's
                # default retry would back off for seconds, e.g. on a refused password).
                "retry": Retry(NoBackoff(), retries=0),
                **tls_kwargs,
            },
            username=parsed.username,
            password=parsed.password,
            db=parsed.db,
            **tls_kwargs,
        )
        return cls(
            url=url,
            topology="sentinel",
            tls=parsed.tls,
            ssl=ssl,
            sentinel=sentinel,
            master_name=parsed.master_name,
        )

    def client(self, *, blocking: bool, max_connections: int, **kwargs: Any) -> Redis:
        """A client of the master whose pool holds at most ``max_connections``.

        ``blocking``: callers beyond the limit wait (``timeout`` seconds) instead of
        failing. Other keyword arguments go to the connections (timeouts, retry).
        """
        if self.sentinel is not None and self.master_name is not None:
            if blocking:
                kwargs["connection_pool_class"] = SentinelBlockingConnectionPool
            else:
                kwargs.pop("timeout", None)
            # Each new connection asks the sentinels for the master and PINGs it.
            client: Redis = self.sentinel.master_for(
                self.master_name, max_connections=max_connections, check_connection=True, **kwargs
            )
            return client
        pool_class = BlockingConnectionPool if blocking else ConnectionPool
        if not blocking:
            kwargs.pop("timeout", None)
        pool = pool_class.from_url(self.url, max_connections=max_connections, **self.ssl, **kwargs)
        return Redis.from_pool(pool)

    async def sentinel_view(self) -> dict[str, Any] | None:
        """What the sentinels say: the master's address and its replicas' (None when
        this is not a sentinel topology). Raises redis errors when no sentinel answers."""
        if self.sentinel is None or self.master_name is None:
            return None
        host, port = await self.sentinel.discover_master(self.master_name)
        replicas = await self.sentinel.discover_slaves(self.master_name)
        return {
            "master": f"{host}:{port}",
            "replicas": [f"{_text(h)}:{_text(p)}" for h, p in replicas],
            "sentinels": len(self.sentinel.sentinels),
        }

    async def describe(self, redis: Redis) -> Topology:
        """The topology behind ``redis`` (a client from :meth:`client`), for ``quiesce check``."""
        view = await self.sentinel_view()
        if view is None:
            kwargs = redis.connection_pool.connection_kwargs
            address = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
            if "path" in kwargs:
                address = str(kwargs["path"])
            mode, found, connected = await replication_nodes(redis, address)
            return Topology(mode=mode, tls=self.tls, nodes=found, connected_replicas=connected)
        _, _, connected = await replication_nodes(redis, view["master"])
        nodes: list[tuple[str, str]] = [(view["master"], "master")]
        nodes += [(replica, "replica") for replica in view["replicas"]]
        nodes.append((f"{view['sentinels']} sentinels", "sentinel"))
        return Topology(
            mode="sentinel", tls=self.tls, nodes=tuple(nodes), connected_replicas=connected
        )

    async def sentinel_error(self) -> Exception | None:
        """The first sentinel's own error when asked for the master (None: they all
        answer). redis-py's "No master found" keeps only the error types."""
        if self.sentinel is None or self.master_name is None:
            return None
        for client in self.sentinel.sentinels:
            try:
                await client.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                )
            except Exception as exc:  # whatever it is, it is the reason to report
                return exc
        return None

    async def aclose(self) -> None:
        if self.sentinel is not None:
            await self.sentinel.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
