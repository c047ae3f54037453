"""The connection-limit settings and what ``quiesce serve`` makes of them."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from service.cli import granian_argv, granian_backpressure
from service.config import ConfigError, Settings


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.max_streams == 2000
    assert settings.request_body_timeout_seconds == 10.0


def test_values_are_read() -> None:
    settings = Settings.from_env(
        {"QUIESCE_MAX_STREAMS": "20", "QUIESCE_REQUEST_BODY_TIMEOUT_SECONDS": "2.5"}
    )
    assert settings.max_streams == 20
    assert settings.request_body_timeout_seconds == 2.5


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUIESCE_MAX_STREAMS", "0"),
        ("QUIESCE_MAX_STREAMS", "many"),
        ("QUIESCE_MAX_STREAMS", "1000001"),
        ("QUIESCE_REQUEST_BODY_TIMEOUT_SECONDS", "0"),
        ("QUIESCE_REQUEST_BODY_TIMEOUT_SECONDS", "-1"),
        ("QUIESCE_REQUEST_BODY_TIMEOUT_SECONDS", "soon"),
        ("QUIESCE_REQUEST_BODY_TIMEOUT_SECONDS", "inf"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: "):
        Settings.from_env({name: value})


def test_granian_gets_room_for_every_stream_and_as_much_again() -> None:
    for streams in (1, 20, 2000, 10_000):
        argv = granian_argv(Settings(max_streams=streams), "127.0.0.1")
        backpressure = int(option(argv, "--backpressure"))
        assert backpressure == granian_backpressure(Settings(max_streams=streams))
        assert backpressure >= 2 * streams + 64
    # The default admits the flood the bench holds (1,500 streams + 500 slow bodies)
    # with more than Granian's own default (1,024) to spare.
    assert granian_backpressure(Settings()) - 1500 - 500 > 1024


def test_headers_get_the_body_timeout_within_granian_bounds() -> None:
    def header_timeout(seconds: float) -> int:
        argv = granian_argv(Settings(request_body_timeout_seconds=seconds), "0.0.0.0")
        return int(option(argv, "--http1-header-read-timeout"))

    assert header_timeout(10) == 10_000
    assert header_timeout(2.5) == 2_500
    assert header_timeout(600) == 60_000
    assert header_timeout(0.0001) == 1


RAISE_FD_LIMIT = """
import resource
from service.cli import raise_fd_limit
warning = raise_fd_limit({needed})
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], warning)
"""


def run_with_soft_limit(soft: int, needed: int) -> str:
    def lower() -> None:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )

    done = subprocess.run(
        [sys.executable, "-c", RAISE_FD_LIMIT.format(needed=needed)],
        preexec_fn=lower,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def test_serve_lifts_the_soft_open_files_limit_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"the hard open-files limit is {hard}")
    assert run_with_soft_limit(256, needed=200) == f"{hard} None"
    limit, warning = run_with_soft_limit(256, needed=hard + 1).split(" ", 1)
    assert int(limit) == hard
    assert warning.startswith(f"warning: the open-files limit is {hard}")
