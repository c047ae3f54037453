"""QUIESCE_POD_DELETION_COST: off by default; when on, a pod that cannot reach the
in-cluster API stops at start with one line naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import ConfigError, PodDeletionCostSettings, Settings

REPO = Path(__file__).resolve().parents[2]
POD = "quiesce-7d9f8b6c5d-x2k4p"
IN_CLUSTER = {
    "QUIESCE_POD_DELETION_COST": "true",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
    "QUIESCE_WORKER_ID": POD,
}


@pytest.fixture
def sa_dir(tmp_path: Path) -> Path:
    for name, text in (("token", "a-token\n"), ("ca.crt", "PEM"), ("namespace", "jobs")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_off_unless_asked_for() -> None:
    assert Settings.from_env({}).pod_deletion_cost is None
    off = Settings.from_env({"QUIESCE_POD_DELETION_COST": "false"})
    assert off.pod_deletion_cost is None


def test_on_in_a_pod(sa_dir: Path) -> None:
    settings = Settings.from_env(IN_CLUSTER, service_account_dir=str(sa_dir))
    assert settings.pod_deletion_cost == PodDeletionCostSettings(
        interval_seconds=10.0,
        api_url="https://10.96.0.1:443",
        namespace="jobs",
        pod_name=POD,
        token_file=str(sa_dir / "token"),
        ca_file=str(sa_dir / "ca.crt"),
    )


def test_pod_name_wins_over_the_worker_id_and_ipv6_is_bracketed(sa_dir: Path) -> None:
    environ = {
        **IN_CLUSTER,
        "POD_NAME": "quiesce-abc",
        "KUBERNETES_SERVICE_HOST": "fd00::1",
        "QUIESCE_POD_DELETION_COST": "TRUE",
        "QUIESCE_POD_DELETION_COST_INTERVAL_SECONDS": "2.5",
    }
    cost = Settings.from_env(environ, service_account_dir=str(sa_dir)).pod_deletion_cost
    assert cost is not None
    assert cost.pod_name == "quiesce-abc"
    assert cost.api_url == "https://[fd00::1]:443"
    assert cost.interval_seconds == 2.5


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"QUIESCE_POD_DELETION_COST": "on"}, "expected 'true' or 'false'"),
        ({"QUIESCE_POD_DELETION_COST_INTERVAL_SECONDS": "0.5"}, "must be >= 1"),
        ({"QUIESCE_POD_DELETION_COST_INTERVAL_SECONDS": "often"}, "expected a number"),
        ({"KUBERNETES_SERVICE_HOST": ""}, "not running in a Kubernetes pod"),
        ({"KUBERNETES_SERVICE_PORT": "https"}, "KUBERNETES_SERVICE_PORT is not a port"),
        ({"QUIESCE_WORKER_ID": ""}, "POD_NAME"),
        ({"POD_NAME": "Not_A_Pod"}, "POD_NAME"),
    ],
)
def test_bad_values_name_the_variable(sa_dir: Path, changes: dict[str, str], says: str) -> None:
    environ = {k: v for k, v in {**IN_CLUSTER, **changes}.items() if v}
    with pytest.raises(ConfigError, match="QUIESCE_POD_DELETION_COST") as caught:
        Settings.from_env(environ, service_account_dir=str(sa_dir))
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("missing", ["token", "ca.crt", "namespace"])
def test_missing_service_account_files_stop_the_start(sa_dir: Path, missing: str) -> None:
    (sa_dir / missing).unlink()
    with pytest.raises(ConfigError, match=f"no service-account {missing} at"):
        Settings.from_env(IN_CLUSTER, service_account_dir=str(sa_dir))


def test_a_bad_namespace_file_stops_the_start(sa_dir: Path) -> None:
    (sa_dir / "namespace").write_text("../../etc", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no namespace name"):
        Settings.from_env(IN_CLUSTER, service_account_dir=str(sa_dir))


def test_serve_outside_a_cluster_exits_2_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env={"PATH": os.environ.get("PATH", ""), "QUIESCE_POD_DELETION_COST": "true"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("configuration error: QUIESCE_POD_DELETION_COST:")
