"""Loading user tasks (QUIESCE_TASK_MODULES, entry points) and the @task decorator."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from service.config import ConfigError, Settings
from service.errors import InvalidInput
from service.tasks import RunContext, task
from service.tasks.loader import ENTRY_POINT_GROUP, build_registry

WriteModule = Callable[[str, str], None]


class Params(msgspec.Struct):
    n: int


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteModule]:
    """Write importable modules into a directory on sys.path; forget them afterwards."""
    monkeypatch.syspath_prepend(tmp_path)
    written: list[str] = []

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)

    yield write
    for name in written:
        sys.modules.pop(name, None)


def registry_names(settings: Settings) -> list[str]:
    return [t.name for t in build_registry(settings)]


def test_built_in_tasks_only_by_default() -> None:
    assert registry_names(Settings()) == ["http", "sleep"]


def test_a_task_module_adds_its_tasks() -> None:
    registry = build_registry(Settings(task_modules=("tests.unit.sample_tasks",)))
    assert [t.name for t in registry] == ["http", "sample_echo", "sleep"]
    echo = registry.get("sample_echo")
    assert echo.description == "Return the text it was given."
    assert echo.input_schema()["$defs"]["EchoInput"]["required"] == ["text"]
    with pytest.raises(InvalidInput) as caught:
        echo.parse_input({"text": 1})
    assert caught.value.extra["field"] == "input.text"


def test_a_module_that_does_not_exist_stops_the_start() -> None:
    with pytest.raises(ConfigError) as caught:
        build_registry(Settings(task_modules=("no_such_module_for_quiesce",)))
    message = str(caught.value)
    assert message.startswith("QUIESCE_TASK_MODULES")
    assert "no_such_module_for_quiesce" in message


def test_a_module_that_fails_to_import_stops_the_start(write_module: WriteModule) -> None:
    write_module("quiesce_broken_tasks", "raise RuntimeError('missing dependency xyz')\n")
    with pytest.raises(ConfigError) as caught:
        build_registry(Settings(task_modules=("quiesce_broken_tasks",)))
    assert str(caught.value).startswith("QUIESCE_TASK_MODULES")
    assert "missing dependency xyz" in str(caught.value)


def test_a_module_without_tasks_stops_the_start(write_module: WriteModule) -> None:
    write_module("quiesce_no_tasks", "VALUE = 1\n")
    with pytest.raises(ConfigError) as caught:
        build_registry(Settings(task_modules=("quiesce_no_tasks",)))
    message = str(caught.value)
    assert message.startswith("QUIESCE_TASK_MODULES")
    assert "quiesce_no_tasks" in message
    assert "no tasks" in message


def test_a_duplicate_task_name_stops_the_start(write_module: WriteModule) -> None:
    write_module(
        "quiesce_dup_tasks",
        """
        import msgspec
        from service.tasks import RunContext, task

        class Nothing(msgspec.Struct):
            pass

        @task("sleep")
        async def my_sleep(ctx: RunContext, params: Nothing) -> None:
            return None
        """,
    )
    with pytest.raises(ConfigError) as caught:
        build_registry(Settings(task_modules=("quiesce_dup_tasks",)))
    message = str(caught.value)
    assert "'sleep'" in message
    assert "QUIESCE_TASK_MODULES" in message
    assert "built-in" in message


# --- entry points ----------------------------------------------------------------------


def install_distribution(tmp_path: Path, entry_points: dict[str, str]) -> None:
    """A minimal installed distribution on sys.path declaring ``quiesce.tasks`` entries."""
    dist_info = tmp_path / "sample-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: sample\nVersion: 1.0\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [
        f"{name} = {value}" for name, value in entry_points.items()
    ]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


EP_MODULE = """
import msgspec
from service.tasks import RunContext, task

class Nothing(msgspec.Struct):
    pass

@task("ep_first")
async def first(ctx: RunContext, params: Nothing) -> str:
    return "first"

@task("ep_second")
async def second(ctx: RunContext, params: Nothing) -> str:
    return "second"

not_a_task = object()
"""


def test_an_entry_point_naming_a_module_adds_all_its_tasks(
    tmp_path: Path, write_module: WriteModule
) -> None:
    write_module("quiesce_ep_module", EP_MODULE)
    install_distribution(tmp_path, {"sample": "quiesce_ep_module"})
    assert registry_names(Settings()) == ["ep_first", "ep_second", "http", "sleep"]


def test_an_entry_point_naming_one_task_adds_only_that_one(
    tmp_path: Path, write_module: WriteModule
) -> None:
    write_module("quiesce_ep_single", EP_MODULE)
    install_distribution(tmp_path, {"second": "quiesce_ep_single:second"})
    assert registry_names(Settings()) == ["ep_second", "http", "sleep"]


def test_an_entry_point_naming_something_else_stops_the_start(
    tmp_path: Path, write_module: WriteModule
) -> None:
    write_module("quiesce_ep_other", EP_MODULE)
    install_distribution(tmp_path, {"other": "quiesce_ep_other:not_a_task"})
    with pytest.raises(ConfigError, match="not a Task"):
        build_registry(Settings())


def test_an_entry_point_that_cannot_load_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(tmp_path)
    install_distribution(tmp_path, {"gone": "quiesce_ep_missing_module"})
    with pytest.raises(ConfigError) as caught:
        build_registry(Settings())
    assert str(caught.value).startswith(ENTRY_POINT_GROUP)
    assert "gone" in str(caught.value)


def test_an_entry_point_repeating_a_module_task_stops_the_start(
    tmp_path: Path, write_module: WriteModule
) -> None:
    write_module("quiesce_ep_twice", EP_MODULE)
    install_distribution(tmp_path, {"twice": "quiesce_ep_twice:first"})
    with pytest.raises(ConfigError, match="ep_first"):
        build_registry(Settings(task_modules=("quiesce_ep_twice",)))


# --- @task ------------------------------------------------------------------------------


def test_task_reads_the_input_struct_from_the_annotation() -> None:
    async def double(ctx: RunContext, params: Params) -> int:
        """Twice n."""
        return params.n * 2

    declared = task("double")(double)
    assert declared.name == "double"
    assert declared.input_type is Params
    assert declared.description == "Twice n."
    assert task("double", description="custom")(double).description == "custom"


def test_task_rejects_a_sync_function() -> None:
    def sync(ctx: RunContext, params: Params) -> int:
        return 1

    with pytest.raises(TypeError, match="async"):
        task("sync")(sync)  # type: ignore[arg-type]


@pytest.mark.parametrize("arity", [0, 1, 3])
def test_task_rejects_the_wrong_number_of_parameters(arity: int) -> None:
    async def zero() -> None:
        return None

    async def one(ctx: RunContext) -> None:
        return None

    async def three(ctx: RunContext, params: Params, extra: int) -> None:
        return None

    functions: dict[int, Any] = {0: zero, 1: one, 3: three}
    with pytest.raises(TypeError, match=r"\(ctx, params\)"):
        task("wrong")(functions[arity])


def test_task_rejects_params_that_are_not_a_struct() -> None:
    async def as_dict(ctx: RunContext, params: dict[str, int]) -> None:
        return None

    async def as_int(ctx: RunContext, params: int) -> None:
        return None

    async def unannotated(ctx, params):  # type: ignore[no-untyped-def]
        return None

    for fn in (as_dict, as_int, unannotated):
        with pytest.raises(TypeError, match=r"msgspec\.Struct"):
            task("bad")(fn)
