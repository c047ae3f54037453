"""What ``quiesce check`` and start-up say about a Redis server's settings.

The integration tests cover what a real server reports; here, the combinations a
test server cannot easily be put in (an old version, one persistence mode on while
the other cannot be read).
"""

from __future__ import annotations

import pytest

from service.store.redis_server import ServerReport, version_tuple


def report(**fields: object) -> ServerReport:
    defaults: dict[str, object] = {
        "version": "7.2.4",
        "eviction_policy": "noeviction",
        "rdb_save": "3600 1",
        "aof_enabled": False,
    }
    return ServerReport(**{**defaults, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7.0.15", (7, 0)), ("6.2.0", (6, 2)), ("6.0.20", (6, 0)), ("255.255.255", (255, 255))],
)
def test_versions_compare_by_major_and_minor(text: str, expected: tuple[int, int]) -> None:
    assert version_tuple(text) == expected


def test_a_server_that_keeps_its_data_has_no_warning() -> None:
    assert report().warnings() == []
    assert report(rdb_save="", aof_enabled=True).warnings() == []
    # AOF on is enough, even when the RDB schedule could not be read.
    assert report(rdb_save=None, aof_enabled=True).warnings() == []


def test_a_server_older_than_6_2_is_named() -> None:
    assert report(version="6.0.16").warnings() == [
        ("version", "6.0.16 is too old: use Redis 6.2 or later")
    ]
    assert report(version="6.2.0").warnings() == []


def test_unreadable_settings_are_reported_as_not_checked() -> None:
    settings = [s for s, _ in report(eviction_policy=None, rdb_save=None).warnings()]
    assert settings == ["maxmemory-policy", "persistence"]
    assert all("could not be checked" in d for _, d in report(eviction_policy=None).warnings())


def test_persistence_is_described_in_one_phrase() -> None:
    assert report().persistence() == 'rdb save "3600 1", aof off'
    assert report(rdb_save="", aof_enabled=None).persistence() == "rdb save off, aof unknown"
