"""Real Redis topologies for the store: a TLS server, and a master + replica + 3 sentinels.

Every process is started here from the ``redis-server`` binary (``--sentinel`` makes
it a sentinel), on free ports, with its files in a temporary directory, and stopped
at the end of the session even when a test fails. Certificates are made at test time
(trustme). The topology tests only run where redis-server was built with TLS, as
Debian's is.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from service.config import Settings
from service.store import RunStore, open_store
from tests.conftest import free_port, require_tool

MASTER_NAME = "quiesce-master"
#: The master's (and replica's) password, and the sentinels' own.
DATA_PASSWORD = "data-password-0123456789"
SENTINEL_PASSWORD = "sentinel-password-0123456789"
#: Sentinel timings for tests: a master is down after 1 s; a failover starts at once.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


def wait_for(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Processes:
    """Processes started for a topology; all stopped by stop(), whatever happened."""

    directory: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with (self.directory / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                [require_tool("redis-server"), *args], stdout=log, stderr=subprocess.STDOUT
            )
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
                process.wait()


# --- TLS ----------------------------------------------------------------------------


@dataclass
class TlsServer:
    port: int
    ca_file: str
    cert_file: str
    key_file: str
    other_ca_file: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": self.url,
            "redis_ca_file": self.ca_file,
            "redis_cert_file": self.cert_file,
            "redis_key_file": self.key_file,
        }
        values.update(overrides)
        return Settings(**values)

    def env(self, **overrides: str) -> dict[str, str]:
        values = {
            "QUIESCE_REDIS_URL": self.url,
            "QUIESCE_REDIS_CA_FILE": self.ca_file,
            "QUIESCE_REDIS_CERT_FILE": self.cert_file,
            "QUIESCE_REDIS_KEY_FILE": self.key_file,
        }
        values.update(overrides)
        return values

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port,
            ssl=True,
            ssl_ca_certs=self.ca_file,
            ssl_certfile=self.cert_file,
            ssl_keyfile=self.key_file,
        )


@dataclass(frozen=True)
class TlsFiles:
    """A CA made at test time, a server certificate for 127.0.0.1 and localhost, a
    client certificate, and another CA that signed neither."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("quiesce-client")
        files = cls(*(str(directory / name) for name in (
            "ca.pem", "server.pem", "server.key", "client.pem", "client.key", "other-ca.pem"
        )))  # fmt: skip
        ca.cert_pem.write_to_path(files.ca)
        server.cert_chain_pems[0].write_to_path(files.server_cert)
        server.private_key_pem.write_to_path(files.server_key)
        client.cert_chain_pems[0].write_to_path(files.client_cert)
        client.private_key_pem.write_to_path(files.client_key)
        trustme.CA().cert_pem.write_to_path(files.other_ca)
        return files

    def server_args(self, auth_clients: str) -> list[str]:
        """redis-server's TLS options (also for replication and sentinels)."""
        return [
            "--tls-cert-file", self.server_cert, "--tls-key-file", self.server_key,
            "--tls-ca-cert-file", self.ca, "--tls-auth-clients", auth_clients,
            "--tls-replication", "yes",
        ]  # fmt: skip

    def client_kwargs(self) -> dict[str, Any]:
        return {
            "ssl": True,
            "ssl_ca_certs": self.ca,
            "ssl_certfile": self.client_cert,
            "ssl_keyfile": self.client_key,
        }


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A redis-server on TLS only, which requires a client certificate (mutual TLS)."""
    directory = tmp_path_factory.mktemp("tls")
    files = TlsFiles.make(directory)
    processes = Processes(directory)
    port = free_port()
    try:
        process = processes.spawn(
            "tls",
            [
                "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                *files.server_args("yes"),
                "--save", "", "--appendonly", "no", "--dir", str(directory),
            ],
        )  # fmt: skip
        server = TlsServer(
            port=port,
            ca_file=files.ca,
            cert_file=files.client_cert,
            key_file=files.client_key,
            other_ca_file=files.other_ca,
            process=process,
        )

        def ping() -> bool:
            with server.client() as client:
                return bool(client.ping())

        wait_for(ping, "the TLS redis-server")
        yield server
    finally:
        processes.stop()


# --- Sentinel -----------------------------------------------------------------------


@dataclass
class SentinelTopology:
    """A master, one replica and three sentinels watching them."""

    processes: Processes
    master_port: int
    replica_port: int
    sentinel_ports: list[int]
    nodes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    node_args: dict[int, list[str]] = field(default_factory=dict)
    #: Everything over TLS (nodes, replication, sentinels) when set.
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        scheme = "redis+sentinel" if self.tls is None else "rediss+sentinel"
        return f"{scheme}://:{DATA_PASSWORD}@{hosts}/{MASTER_NAME}/0"

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": self.url,
            "redis_sentinel_password": SENTINEL_PASSWORD,
        }
        if self.tls is not None:
            values |= {
                "redis_ca_file": self.tls.ca,
                "redis_cert_file": self.tls.client_cert,
                "redis_key_file": self.tls.client_key,
            }
        values.update(overrides)
        return Settings(**values)

    def env(self, **overrides: str) -> dict[str, str]:
        values = {
            "QUIESCE_REDIS_URL": self.url,
            "QUIESCE_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        }
        if self.tls is not None:
            values |= {
                "QUIESCE_REDIS_CA_FILE": self.tls.ca,
                "QUIESCE_REDIS_CERT_FILE": self.tls.client_cert,
                "QUIESCE_REDIS_KEY_FILE": self.tls.client_key,
            }
        values.update(overrides)
        return values

    def _tls_kwargs(self) -> dict[str, Any]:
        return {} if self.tls is None else self.tls.client_kwargs()

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port, password=DATA_PASSWORD, socket_timeout=2, **self._tls_kwargs()
        )

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port, password=SENTINEL_PASSWORD, socket_timeout=2, **self._tls_kwargs()
        )

    def master_port_now(self) -> int:
        """The master's port as the first sentinel that answers says."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), self.sentinel(port) as client:
                address = client.sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(address[1])
        raise RuntimeError("no sentinel answers")

    def failover_done(self, old_master: int) -> bool:
        """Whether the failover away from ``old_master`` is complete: every sentinel
        names the same new master, and that node says it is one. (Restarting the old
        master before then can abort the failover: the sentinels may take the old,
        empty node back as master and have the promoted replica resync from it.)"""
        ports = set()
        for port in self.sentinel_ports:
            try:
                with self.sentinel(port) as client:
                    ports.add(int(client.sentinel_get_master_addr_by_name(MASTER_NAME)[1]))
            except redis.RedisError:
                return False
        if len(ports) != 1 or old_master in ports:
            return False
        try:
            with self.node(ports.pop()) as client:
                return bool(client.role()[0] in (b"master", "master"))
        except redis.RedisError:
            return False

    def kill_master(self) -> int:
        """SIGKILL the current master; its port."""
        port = self.master_port_now()
        process = self.nodes[port]
        process.send_signal(signal.SIGKILL)
        process.wait()
        return port

    def restart(self, port: int) -> None:
        """Start a killed node again, as its pod would be (empty: no persistence); the
        sentinels then make it a replica of the current master."""
        self.nodes[port] = self.processes.spawn(f"node-{port}-again", self.node_args[port])

    @classmethod
    def start(cls, directory: Path, *, tls: bool = False) -> SentinelTopology:
        """Start the topology; with ``tls`` every connection is TLS (mutual TLS
        between the nodes and the sentinels, clients' certificates optional)."""
        directory.mkdir(parents=True, exist_ok=True)
        processes = Processes(directory)
        master, replica = free_port(), free_port()
        files = TlsFiles.make(directory) if tls else None
        topology = cls(processes, master, replica, [free_port() for _ in range(3)], tls=files)

        def listen(port: int) -> list[str]:
            if files is None:
                return ["--port", str(port)]
            return ["--port", "0", "--tls-port", str(port), *files.server_args("optional")]

        try:
            common = [
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--requirepass", DATA_PASSWORD, "--masterauth", DATA_PASSWORD,
                "--dir", str(directory),
            ]  # fmt: skip
            topology.node_args[master] = [*listen(master), *common]
            topology.node_args[replica] = [
                *listen(replica), *common, "--replicaof", "127.0.0.1", str(master),
            ]  # fmt: skip
            for port, name in ((master, "master"), (replica, "replica")):
                topology.nodes[port] = processes.spawn(name, topology.node_args[port])

            def replica_in_sync() -> bool:
                with topology.node(replica) as client:
                    return client.info("replication").get("master_link_status") == "up"

            wait_for(replica_in_sync, "the replica to sync")
            for index, port in enumerate(topology.sentinel_ports):
                conf = directory / f"sentinel-{index}.conf"
                listening = f"port {port}\n"
                if files is not None:
                    listening = (
                        f"port 0\ntls-port {port}\ntls-cert-file {files.server_cert}\n"
                        f"tls-key-file {files.server_key}\ntls-ca-cert-file {files.ca}\n"
                        "tls-auth-clients optional\ntls-replication yes\n"
                    )
                conf.write_text(
                    f"{listening}bind 127.0.0.1\ndir {directory}\n"
                    f"requirepass {SENTINEL_PASSWORD}\n"
                    f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
                    f"sentinel auth-pass {MASTER_NAME} {DATA_PASSWORD}\n"
                    f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                )
                processes.spawn(f"sentinel-{index}", [str(conf), "--sentinel"])

            def sentinels_ready() -> bool:
                for port in topology.sentinel_ports:
                    with topology.sentinel(port) as client:
                        state = client.sentinel_master(MASTER_NAME)
                        if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                            return False
                return True

            wait_for(sentinels_ready, "the sentinels to find each other and the replica")
        except BaseException:
            processes.stop()
            raise
        return topology


@pytest.fixture(scope="session")
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    """One master + replica + 3 sentinels for the session (never failed over)."""
    topology = SentinelTopology.start(tmp_path_factory.mktemp("sentinel"))
    try:
        yield topology
    finally:
        topology.processes.stop()


@pytest.fixture(scope="session")
def tls_sentinel_topology(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SentinelTopology]:
    """The same, with every connection over TLS (rediss+sentinel://)."""
    topology = SentinelTopology.start(tmp_path_factory.mktemp("tls-sentinel"), tls=True)
    try:
        yield topology
    finally:
        topology.processes.stop()


# --- the store over each topology -----------------------------------------------------


def topology_settings(
    store_kind: str, request: pytest.FixtureRequest, **overrides: Any
) -> Settings:
    if store_kind in ("sentinel", "tls-sentinel"):
        name = "sentinel_topology" if store_kind == "sentinel" else "tls_sentinel_topology"
        topology: SentinelTopology = request.getfixturevalue(name)
        with topology.node(topology.master_port_now()) as client:
            client.flushall()
        return topology.settings(run_retention_seconds=3600, **overrides)
    server: TlsServer = request.getfixturevalue("tls_redis")
    with server.client() as client:
        client.flushall()
    return server.settings(run_retention_seconds=3600, **overrides)


def build_store(store_kind: str, request: pytest.FixtureRequest, **overrides: Any) -> RunStore:
    """A new, unstarted store over the topology (opened as the service opens it)."""
    return open_store(topology_settings(store_kind, request, **overrides))
