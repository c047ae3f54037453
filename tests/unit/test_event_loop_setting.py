"""QUIESCE_EVENT_LOOP: which loop ``quiesce serve`` gives Granian."""

from __future__ import annotations

import importlib.util

import pytest

from service import config
from service.cli import granian_argv
from service.config import ConfigError, Settings


def loop_argument(settings: Settings) -> str:
    argv = granian_argv(settings, "127.0.0.1")
    return argv[argv.index("--loop") + 1]


@pytest.mark.parametrize("value", ["asyncio", "uvloop", " UVLOOP ", "Asyncio"])
def test_an_explicit_loop_is_passed_to_granian(value: str) -> None:
    settings = Settings.from_env({"QUIESCE_EVENT_LOOP": value})
    assert loop_argument(settings) == value.strip().lower()


def test_auto_is_the_default_and_means_uvloop_when_installed() -> None:
    settings = Settings.from_env({})
    assert settings.event_loop == "auto"
    installed = importlib.util.find_spec("uvloop") is not None
    assert loop_argument(settings) == ("uvloop" if installed else "asyncio")


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_uvloop_installed", lambda: False)
    assert loop_argument(Settings.from_env({"QUIESCE_EVENT_LOOP": "auto"})) == "asyncio"


def test_uvloop_asked_for_but_not_installed_stops_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "_uvloop_installed", lambda: False)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"QUIESCE_EVENT_LOOP": "uvloop"})
    assert str(caught.value).startswith("QUIESCE_EVENT_LOOP: 'uvloop' is not installed")
