"""The depth check that runs before a create body is decoded.

msgspec decodes nested JSON recursively (about 1,000 levels raise RecursionError), so
``json_depth_exceeds`` must count nesting exactly as JSON does: brackets inside strings,
escaped quotes included, do not nest.
"""

from __future__ import annotations

import pytest

from service.config import ConfigError, Settings
from service.schemas import json_depth_exceeds


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"{}", 1),
        (b'{"a": 1}', 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b"[[[]], [[[]]]]", 4),
        (b'{"a": "[[[[[[[[[[[["}', 1),
        (b'{"a": "\\"[[[[[[[[", "b": {"c": "]]]"}}', 2),
        (b'{"a": "\\\\", "b": [[["x"]]]}', 4),
        (b"[" * 1000 + b"]" * 1000, 1000),
    ],
)
def test_depth_is_counted_outside_strings(body: bytes, depth: int) -> None:
    assert json_depth_exceeds(body, depth - 1)
    assert not json_depth_exceeds(body, depth)


def test_a_body_with_few_brackets_is_never_too_deep() -> None:
    """The fast path: no more brackets than the limit cannot nest deeper than it."""
    assert not json_depth_exceeds(b'{"task": "sleep", "input": {"seconds": 1}}', 2)


def test_the_limit_is_read_from_the_environment() -> None:
    assert Settings.from_env({}).max_json_depth == 64
    assert Settings.from_env({"QUIESCE_MAX_JSON_DEPTH": "10"}).max_json_depth == 10


@pytest.mark.parametrize("value", ["1", "257", "deep", "-3"])
def test_a_bad_limit_stops_start_up_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^QUIESCE_MAX_JSON_DEPTH:"):
        Settings.from_env({"QUIESCE_MAX_JSON_DEPTH": value})
