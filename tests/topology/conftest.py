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


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A redis-server on TLS only, which requires a client certificate (mutual TLS)."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("quiesce-client")
    paths = {
        "ca": directory / "ca.pem",
        "server_cert": directory / "server.pem",
        "server_key": directory / "server.key",
        "client_cert": directory / "client.pem",
        "client_key": directory / "client.key",
        "other_ca": directory / "other-ca.pem",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(paths["server_cert"]))
    server_cert.private_key_pem.write_to_path(str(paths["server_key"]))
    client_cert.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client_cert.private_key_pem.write_to_path(str(paths["client_key"]))
    trustme.CA().cert_pem.write_to_path(str(paths["other_ca"]))
    processes = Processes(directory)
    port = free_port()
    try:
        process = processes.spawn(
            "tls",
            [
                "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(paths["server_cert"]),
                "--tls-key-file", str(paths["server_key"]),
                "--tls-ca-cert-file", str(paths["ca"]),
                "--tls-auth-clients", "yes",
                "--save", "", "--appendonly", "no", "--dir", str(directory),
            ],
        )  # fmt: skip
        server = TlsServer(
            port=port,
            ca_file=str(paths["ca"]),
            cert_file=str(paths["client_cert"]),
            key_file=str(paths["client_key"]),
            other_ca_file=str(paths["other_ca"]),
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

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://:{DATA_PASSWORD}@{hosts}/{MASTER_NAME}/0"

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": self.url,
            "redis_sentinel_password": SENTINEL_PASSWORD,
        }
        values.update(overrides)
        return Settings(**values)

    def env(self, **overrides: str) -> dict[str, str]:
        values = {
            "QUIESCE_REDIS_URL": self.url,
            "QUIESCE_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        }
        values.update(overrides)
        return values

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=DATA_PASSWORD, socket_timeout=2)

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=SENTINEL_PASSWORD, socket_timeout=2)

    def master_port_now(self) -> int:
        """The master's port as the first sentinel that answers says."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), self.sentinel(port) as client:
                address = client.sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(address[1])
        raise RuntimeError("no sentinel answers")

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
    def start(cls, directory: Path) -> SentinelTopology:
        directory.mkdir(parents=True, exist_ok=True)
        processes = Processes(directory)
        master, replica = free_port(), free_port()
        topology = cls(processes, master, replica, [free_port() for _ in range(3)])
        try:
            common = [
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--requirepass", DATA_PASSWORD, "--masterauth", DATA_PASSWORD,
            ]  # fmt: skip
            topology.node_args[master] = ["--port", str(master), "--dir", str(directory), *common]
            topology.node_args[replica] = [
                "--port", str(replica), "--dir", str(directory), *common,
                "--replicaof", "127.0.0.1", str(master),
            ]  # fmt: skip
            for port, name in ((master, "master"), (replica, "replica")):
                topology.nodes[port] = processes.spawn(name, topology.node_args[port])

            def replica_in_sync() -> bool:
                with topology.node(replica) as client:
                    return client.info("replication").get("master_link_status") == "up"

            wait_for(replica_in_sync, "the replica to sync")
            for index, port in enumerate(topology.sentinel_ports):
                conf = directory / f"sentinel-{index}.conf"
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
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


# --- the store over each topology -----------------------------------------------------


def topology_settings(
    store_kind: str, request: pytest.FixtureRequest, **overrides: Any
) -> Settings:
    if store_kind == "sentinel":
        topology: SentinelTopology = request.getfixturevalue("sentinel_topology")
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
