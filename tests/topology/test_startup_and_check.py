"""Start-up refuses a store it can never use, in one line; ``quiesce check`` reports
the topology it found and round-trips a write through it.

``quiesce serve`` is run for real: its store check runs before Granian is started,
so a refused start exits 2 without ever listening. (A successful serve is not run
here; tests/e2e covers serving.)
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import RedisServer
from tests.integration.test_cli_and_logs import run_cli
from tests.topology.conftest import MASTER_NAME, SentinelTopology, TlsServer

pytestmark = pytest.mark.topology


def refused_start(result: subprocess.CompletedProcess[str]) -> str:
    """The single line of a start refused for its configuration (exit 2, no trace)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("configuration error: QUIESCE_REDIS_URL: "), lines[0]
    return lines[0]


def test_a_certificate_from_another_ca_stops_the_start(tls_redis: TlsServer) -> None:
    result = run_cli("serve", **tls_redis.env(QUIESCE_REDIS_CA_FILE=tls_redis.other_ca_file))
    line = refused_start(result)
    assert "TLS verification failed" in line
    assert "certificate verify failed" in line


def test_a_sentinel_url_naming_a_plain_server_stops_the_start(redis_server: RedisServer) -> None:
    result = run_cli(
        "serve", QUIESCE_REDIS_URL=f"redis+sentinel://127.0.0.1:{redis_server.port}/{MASTER_NAME}"
    )
    line = refused_start(result)
    assert "are not sentinels" in line


def test_a_plain_url_naming_a_sentinel_stops_the_start(
    sentinel_topology: SentinelTopology,
) -> None:
    port = sentinel_topology.sentinel_ports[0]
    from tests.topology.conftest import SENTINEL_PASSWORD

    result = run_cli("serve", QUIESCE_REDIS_URL=f"redis://:{SENTINEL_PASSWORD}@127.0.0.1:{port}/0")
    line = refused_start(result)
    assert "is a sentinel, not a Redis server" in line
    assert SENTINEL_PASSWORD not in line


def test_a_wrong_sentinel_password_stops_the_start(sentinel_topology: SentinelTopology) -> None:
    wrong = "not-the-sentinel-password-0123"
    result = run_cli("serve", **sentinel_topology.env(QUIESCE_REDIS_SENTINEL_PASSWORD=wrong))
    line = refused_start(result)
    assert "authentication failed: the sentinels refused the credentials" in line


def test_a_wrong_master_password_stops_the_start(sentinel_topology: SentinelTopology) -> None:
    url = sentinel_topology.url.replace(":data-password", ":wrong-password")
    result = run_cli("serve", **sentinel_topology.env(QUIESCE_REDIS_URL=url))
    line = refused_start(result)
    assert "authentication failed" in line


def test_check_reports_the_sentinel_topology(sentinel_topology: SentinelTopology) -> None:
    result = run_cli("check", **sentinel_topology.env(QUIESCE_REDIS_MIN_REPLICAS="1"))
    assert result.returncode == 0, result.stderr
    master = sentinel_topology.master_port_now()
    replica = next(
        p for p in (sentinel_topology.master_port, sentinel_topology.replica_port) if p != master
    )
    assert (
        f"redis: mode sentinel; TLS off; nodes 127.0.0.1:{master} (master), "
        f"127.0.0.1:{replica} (replica), 3 sentinels (sentinel)"
    ) in result.stdout
    assert "redis: probe write confirmed by 1 replicas (WAIT)" in result.stdout
    assert "probe key written, read and deleted" in result.stdout


def test_check_fails_when_fewer_replicas_than_required_confirm(
    sentinel_topology: SentinelTopology,
) -> None:
    result = run_cli("check", **sentinel_topology.env(QUIESCE_REDIS_MIN_REPLICAS="2"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("store: redis only 1 replicas confirmed the probe write")


def test_check_reports_tls_and_the_lone_master(tls_redis: TlsServer) -> None:
    result = run_cli("check", **tls_redis.env())
    assert result.returncode == 0, result.stderr
    assert f"redis: mode standalone; TLS on; nodes 127.0.0.1:{tls_redis.port} (master)" in (
        result.stdout
    )


def test_check_without_the_client_certificate_names_the_tls_handshake(
    tls_redis: TlsServer,
) -> None:
    env = tls_redis.env()
    del env["QUIESCE_REDIS_CERT_FILE"], env["QUIESCE_REDIS_KEY_FILE"]
    result = run_cli("check", **env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_sentinel_and_master_passwords_are_redacted_from_logs() -> None:
    from service.config import Settings
    from service.logging import REDACTED, Redactor

    settings = Settings(
        redis_url="redis+sentinel://:master-secret-123456@s1,s2/mymaster",
        redis_sentinel_password="sentinel-secret-123456",
    )
    redactor = Redactor.for_settings(settings)
    assert redactor is not None
    line = redactor(None, "", "auth master-secret-123456 then sentinel-secret-123456")
    assert line == f"auth {REDACTED} then {REDACTED}"
    env = {
        "QUIESCE_REDIS_URL": settings.redis_url or "",
        "QUIESCE_REDIS_SENTINEL_PASSWORD": "sentinel-secret-123456",
    }
    from_env = Redactor.from_env(env)
    assert from_env is not None
    assert "secret" not in from_env(None, "", "master-secret-123456 sentinel-secret-123456")


def test_check_reports_sentinel_over_tls(tls_sentinel_topology: SentinelTopology) -> None:
    result = run_cli("check", **tls_sentinel_topology.env())
    assert result.returncode == 0, result.stderr
    assert "redis: mode sentinel; TLS on; nodes 127.0.0.1:" in result.stdout
    assert "3 sentinels (sentinel)" in result.stdout


def test_a_wrong_ca_for_tls_sentinels_stops_the_start(
    tls_sentinel_topology: SentinelTopology,
) -> None:
    assert tls_sentinel_topology.tls is not None
    env = tls_sentinel_topology.env(QUIESCE_REDIS_CA_FILE=tls_sentinel_topology.tls.other_ca)
    line = refused_start(run_cli("serve", **env))
    assert "TLS verification failed" in line
