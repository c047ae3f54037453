"""Settings.from_env: defaults, one clear error per bad variable, and the CLI's exit 2."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import ConfigError, Settings

REPO = Path(__file__).resolve().parents[2]
#: Standard Webhooks secrets: "whsec_" and a base64 key.
CALLBACK_SECRET = "whsec_" + base64.b64encode(b"c" * 24).decode()
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"w" * 32).decode()

BAD_VALUES: list[tuple[str, str]] = [
    ("PORT", "0"),
    ("PORT", "65536"),
    ("PORT", "abc"),
    ("PORT", "80.5"),
    ("QUIESCE_MAX_ACTIVE_RUNS", "0"),
    ("QUIESCE_MAX_ACTIVE_RUNS", "-3"),
    ("QUIESCE_MAX_ACTIVE_RUNS", "many"),
    ("QUIESCE_SHUTDOWN_GRACE_SECONDS", "-1"),
    ("QUIESCE_SHUTDOWN_GRACE_SECONDS", "soon"),
    ("QUIESCE_SHUTDOWN_GRACE_SECONDS", "nan"),
    ("QUIESCE_SHUTDOWN_GRACE_SECONDS", "inf"),
    ("QUIESCE_RUN_TIMEOUT_SECONDS", "0"),
    ("QUIESCE_RUN_TIMEOUT_SECONDS", "-5"),
    ("QUIESCE_RUN_RETENTION_SECONDS", "10"),
    ("QUIESCE_RUN_RETENTION_SECONDS", "1.5"),
    ("QUIESCE_REDIS_URL", "http://x"),
    ("QUIESCE_REDIS_URL", "localhost:6379"),
    ("REDIS_URL", "http://x"),
    ("QUIESCE_API_TOKEN", "short"),
    ("QUIESCE_CALLBACK_SECRET", "short"),
    ("QUIESCE_WEBHOOK_SECRET", "short"),
    ("QUIESCE_WORKER_ID", "bad id"),
    ("QUIESCE_WORKER_ID", "-leading-dash"),
    ("QUIESCE_WORKER_ID", "x" * 254),
    ("QUIESCE_TASK_MODULES", "not a module"),
    ("QUIESCE_TASK_MODULES", "good.module, 1bad"),
    ("QUIESCE_HTTP_ALLOWED_HOSTS", "exa mple.com"),
    ("QUIESCE_HTTP_ALLOWED_HOSTS", "https://example.com"),
    ("QUIESCE_HTTP_ALLOWED_HOSTS", "example.com:443"),
    ("QUIESCE_LOG_FORMAT", "xml"),
    ("QUIESCE_LEASE_TTL_SECONDS", "1"),
    ("QUIESCE_EVENT_LOOP", "trio"),
]


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings(
        port=8000,
        redis_url=None,
        shutdown_grace_seconds=25.0,
        max_active_runs=100,
        run_timeout_seconds=3600.0,
        run_retention_seconds=86400,
        api_token=None,
        worker_id=socket.gethostname(),
        task_modules=(),
        http_allowed_hosts=(),
        log_format=None,
        lease_ttl_seconds=15.0,
        callback_secret=None,
        webhook_secret=None,
    )


#: Unset changes behaviour (auth, signing, the store): an empty value is an error.
MUST_NOT_BE_EMPTY = [
    "QUIESCE_API_TOKEN",
    "QUIESCE_CALLBACK_SECRET",
    "QUIESCE_WEBHOOK_SECRET",
    "QUIESCE_REDIS_URL",
    "REDIS_URL",
]


def test_blank_values_count_as_unset() -> None:
    blank = {name: "  " for name, _ in BAD_VALUES if name not in MUST_NOT_BE_EMPTY}
    assert Settings.from_env(blank) == Settings.from_env({})


@pytest.mark.parametrize("value", ["", "   ", "\t"])
@pytest.mark.parametrize("name", MUST_NOT_BE_EMPTY)
def test_an_empty_secret_or_store_url_is_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}: is set but empty; unset it to "), message
    assert "\n" not in message


def test_an_empty_redis_url_is_irrelevant_when_quiesce_redis_url_is_set() -> None:
    env = {"QUIESCE_REDIS_URL": "redis://mine:6379/1", "REDIS_URL": ""}
    assert Settings.from_env(env).redis_url == "redis://mine:6379/1"


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "PORT": "9000",
            "QUIESCE_REDIS_URL": "rediss://cache:6380/2",
            "QUIESCE_SHUTDOWN_GRACE_SECONDS": "0",
            "QUIESCE_MAX_ACTIVE_RUNS": "7",
            "QUIESCE_RUN_TIMEOUT_SECONDS": "1.5",
            "QUIESCE_RUN_RETENTION_SECONDS": "60",
            "QUIESCE_API_TOKEN": "t" * 16,
            "QUIESCE_WORKER_ID": "quiesce-7d9f-abcde",
            "QUIESCE_TASK_MODULES": " myproject.tasks , other_tasks ",
            "QUIESCE_HTTP_ALLOWED_HOSTS": "API.example.com, *.internal, 10.0.0.0/8, ::1",
            "QUIESCE_LOG_FORMAT": "console",
            "QUIESCE_LEASE_TTL_SECONDS": "3",
            "QUIESCE_CALLBACK_SECRET": CALLBACK_SECRET,
            "QUIESCE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }
    )
    assert settings == Settings(
        port=9000,
        redis_url="rediss://cache:6380/2",
        shutdown_grace_seconds=0.0,
        max_active_runs=7,
        run_timeout_seconds=1.5,
        run_retention_seconds=60,
        api_token="t" * 16,
        worker_id="quiesce-7d9f-abcde",
        task_modules=("myproject.tasks", "other_tasks"),
        http_allowed_hosts=("api.example.com", "*.internal", "10.0.0.0/8", "::1"),
        log_format="console",
        lease_ttl_seconds=3.0,
        callback_secret=CALLBACK_SECRET,
        webhook_secret=WEBHOOK_SECRET,
    )


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_bad_value_raises_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}:"), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name", ["QUIESCE_API_TOKEN", "QUIESCE_CALLBACK_SECRET", "QUIESCE_WEBHOOK_SECRET"]
)
def test_secrets_never_appear_in_error_messages(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: "hunter2-secret"})
    assert "hunter2" not in str(caught.value)


def test_a_redis_password_never_appears_in_error_messages() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"QUIESCE_REDIS_URL": "http://user:hunter2-secret@cache:6379/0"})
    assert "hunter2" not in str(caught.value)


def test_redis_url_falls_back_to_redis_url() -> None:
    assert Settings.from_env({"REDIS_URL": "redis://a:6379/0"}).redis_url == "redis://a:6379/0"
    both = {"QUIESCE_REDIS_URL": "redis://mine:6379/1", "REDIS_URL": "redis://theirs:6379/0"}
    assert Settings.from_env(both).redis_url == "redis://mine:6379/1"
    assert Settings.from_env({"REDIS_URL": "unix:///run/redis.sock"}).redis_url is not None
    # The fallback is only consulted when the first is unset: a bad REDIS_URL is
    # irrelevant then.
    shadowed = {"QUIESCE_REDIS_URL": "redis://mine:6379/1", "REDIS_URL": "http://x"}
    assert Settings.from_env(shadowed).redis_url == "redis://mine:6379/1"


def test_the_first_bad_variable_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"^PORT:"):
        Settings.from_env({"PORT": "x", "QUIESCE_LOG_FORMAT": "xml"})


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("command", "name", "value"),
    [
        ("serve", "PORT", "abc"),
        ("serve", "QUIESCE_API_TOKEN", "hunter2"),
        ("serve", "QUIESCE_API_TOKEN", ""),
        ("check", "QUIESCE_REDIS_URL", " "),
        ("check", "QUIESCE_LOG_FORMAT", "xml"),
    ],
)
def test_the_cli_exits_2_with_one_line_naming_the_variable(
    command: str, name: str, value: str
) -> None:
    result = _run_cli(command, env={name: value})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    if name == "QUIESCE_API_TOKEN" and value:
        assert value not in lines[0]
    assert result.stdout == ""


# --- Redis topologies: Sentinel URLs, TLS files, replica confirmation --------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h1:26379,h2:26379", "names no master"),
        ("redis+sentinel://h1:26379,h2:26379/", "names no master"),
        ("redis+sentinel://h1:263x9/mymaster", "bad port"),
        ("redis+sentinel://h1:70000/mymaster", "bad port"),
        ("redis+sentinel://h1:26379,,h2/mymaster", "is empty"),
        ("redis+sentinel://:26379/mymaster", "has no host"),
        ("redis+sentinel://h1/mymaster/zero", "must be a whole number"),
        ("redis+sentinel://h1/mymaster/0/extra", "expected /<master-name>[/<db>]"),
    ],
)
def test_a_bad_sentinel_url_is_one_line_naming_the_variable(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"QUIESCE_REDIS_URL": url})
    text = str(info.value)
    assert text.startswith("QUIESCE_REDIS_URL: ")
    assert message in text
    assert "\n" not in text


def test_a_sentinel_url_is_parsed_with_its_credentials_hosts_master_and_db() -> None:
    from service.config import parse_sentinel_url

    parsed = parse_sentinel_url("rediss+sentinel://app:p%40ss@h1:26380,[::1],h3/mymaster/3")
    assert parsed.sentinels == (("h1", 26380), ("::1", 26379), ("h3", 26379))
    assert (parsed.master_name, parsed.db, parsed.tls) == ("mymaster", 3, True)
    assert (parsed.username, parsed.password) == ("app", "p@ss")


def test_a_password_in_a_bad_sentinel_url_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"QUIESCE_REDIS_URL": "redis+sentinel://:hunter2-secret@h1:bad/m"})
    assert "hunter2-secret" not in str(info.value)


def test_topology_settings_are_read(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem"))
    for path in (ca, cert, key):
        path.write_text("x")
    settings = Settings.from_env(
        {
            "QUIESCE_REDIS_URL": "rediss+sentinel://s1,s2/mymaster",
            "QUIESCE_REDIS_CA_FILE": str(ca),
            "QUIESCE_REDIS_CERT_FILE": str(cert),
            "QUIESCE_REDIS_KEY_FILE": str(key),
            "QUIESCE_REDIS_SENTINEL_PASSWORD": "sentinel-secret",
            "QUIESCE_REDIS_MIN_REPLICAS": "1",
            "QUIESCE_REDIS_WAIT_TIMEOUT_SECONDS": "0.25",
            "QUIESCE_REDIS_MODE": "sentinel",
        }
    )
    assert (settings.redis_ca_file, settings.redis_cert_file, settings.redis_key_file) == (
        str(ca),
        str(cert),
        str(key),
    )
    assert settings.redis_sentinel_password == "sentinel-secret"
    assert (settings.redis_min_replicas, settings.redis_wait_timeout_seconds) == (1, 0.25)
    assert settings.redis_mode == "sentinel"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        (
            {"QUIESCE_REDIS_URL": "redis://h:6379/0", "QUIESCE_REDIS_CA_FILE": "/x"},
            "QUIESCE_REDIS_CA_FILE",
        ),
        (
            {"QUIESCE_REDIS_URL": "rediss://h:6379/0", "QUIESCE_REDIS_CA_FILE": "/does/not/exist"},
            "QUIESCE_REDIS_CA_FILE",
        ),
        (
            {"QUIESCE_REDIS_URL": "rediss://h:6379/0", "QUIESCE_REDIS_CERT_FILE": __file__},
            "QUIESCE_REDIS_CERT_FILE",
        ),
        (
            {"QUIESCE_REDIS_URL": "rediss://h:6379/0", "QUIESCE_REDIS_KEY_FILE": __file__},
            "QUIESCE_REDIS_CERT_FILE",
        ),
        (
            {"QUIESCE_REDIS_URL": "redis://h:6379/0", "QUIESCE_REDIS_SENTINEL_PASSWORD": "pw"},
            "QUIESCE_REDIS_SENTINEL_PASSWORD",
        ),
        (
            {"QUIESCE_REDIS_URL": "redis+sentinel://s/m", "QUIESCE_REDIS_SENTINEL_PASSWORD": ""},
            "QUIESCE_REDIS_SENTINEL_PASSWORD",
        ),
        (
            {"QUIESCE_REDIS_URL": "redis://h:6379/0", "QUIESCE_REDIS_MODE": "sentinel"},
            "QUIESCE_REDIS_MODE",
        ),
        (
            {"QUIESCE_REDIS_URL": "redis+sentinel://s/m", "QUIESCE_REDIS_MODE": "cluster"},
            "QUIESCE_REDIS_MODE",
        ),
        ({"QUIESCE_REDIS_MODE": "replicated"}, "QUIESCE_REDIS_MODE"),
        ({"QUIESCE_REDIS_MIN_REPLICAS": "1"}, "QUIESCE_REDIS_MIN_REPLICAS"),
        (
            {"QUIESCE_REDIS_URL": "redis://h:6379/0", "QUIESCE_REDIS_MIN_REPLICAS": "-1"},
            "QUIESCE_REDIS_MIN_REPLICAS",
        ),
        ({"QUIESCE_REDIS_WAIT_TIMEOUT_SECONDS": "2"}, "QUIESCE_REDIS_WAIT_TIMEOUT_SECONDS"),
        ({"QUIESCE_REDIS_WAIT_TIMEOUT_SECONDS": "0"}, "QUIESCE_REDIS_WAIT_TIMEOUT_SECONDS"),
    ],
)
def test_bad_topology_settings_name_their_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(f"{variable}: ")
    assert "\n" not in str(info.value)
