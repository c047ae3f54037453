"""A real Redis Cluster for tests: three masters and three replicas on free ports.

Started from the ``redis-server`` and ``redis-cli`` binaries in a temporary directory
(``redis-cli --cluster create ... --cluster-replicas 1``); stopped (every process,
even after a failed start) by ``stop()``. Tests may kill a master (``kill_master``)
to force a failover, and ``restart`` brings a killed node back as a replica.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

#: Short, so a failover in a test takes about a second or two.
NODE_TIMEOUT_MS = 1000


def _port_pair_free(port: int) -> bool:
    for candidate in (port, port + 10000):  # the cluster bus listens on port + 10000
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """``count`` ports whose cluster-bus port (+10000) is free as well."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < 55535 and port not in ports and _port_pair_free(port):
            ports.append(port)
    return ports


@dataclass
class RedisClusterNodes:
    """Six redis-server processes joined into one cluster."""

    server: str
    cli: str
    ports: list[int]
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="qcluster-")))
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The URL of one node, as a user would configure it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        try:
            for port in self.ports:
                self._start_node(port)
            addresses = [f"127.0.0.1:{port}" for port in self.ports]
            subprocess.run(
                [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "1",
                 "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
            )  # fmt: skip
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def _start_node(self, port: int) -> None:
        node_dir = self.directory / str(port)
        node_dir.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [self.server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(node_dir / "nodes.conf"),
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--dir", str(node_dir),
             "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(redis.ConnectionError),
                redis.Redis(port=port, socket_connect_timeout=0.2) as client,
            ):
                client.ping()
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {port}")

    def alive(self) -> list[int]:
        return [port for port, p in self.processes.items() if p.poll() is None]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node reports ``cluster_state:ok`` and sees three masters,
        and every replica is in sync with its master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ok(port) for port in self.alive()):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def _ok(self, port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_connect_timeout=0.5) as client:
                info = client.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return False
        text = info.decode() if isinstance(info, bytes) else str(info)
        if "cluster_state:ok" not in text or "cluster_size:3" not in text:
            return False
        # A replica that has not synced yet would refuse to take over (its data
        # counts as too old), so a failover test could wait forever.
        with redis.Redis(port=port, socket_connect_timeout=0.5) as client:
            replication = client.info("replication")
        return bool(
            replication.get("role") == "master" or replication.get("master_link_status") == "up"
        )

    def masters(self) -> list[int]:
        masters = []
        for port in self.alive():
            with redis.Redis(port=port) as client:
                if client.info("replication").get("role") == "master":
                    masters.append(port)
        return masters

    def master_of(self, key: str) -> int:
        """The port of the master that owns ``key``'s slot now."""
        with redis.RedisCluster(host="127.0.0.1", port=self.alive()[0]) as client:
            node = client.get_node_from_key(key)
            return int(node.port)

    def kill(self, port: int) -> None:
        process = self.processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def restart(self, port: int) -> None:
        """Bring a killed node back (it rejoins, as a replica of its successor)."""
        self._start_node(port)

    def flush(self) -> None:
        for port in self.masters():
            with redis.Redis(port=port) as client:
                client.flushall()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


@contextlib.contextmanager
def running_cluster(server: str, cli: str) -> Iterator[RedisClusterNodes]:
    """Six nodes on free ports, joined; stopped and removed even when a test fails."""
    nodes = RedisClusterNodes(server=server, cli=cli, ports=free_cluster_ports(6))
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(nodes.directory, ignore_errors=True)
