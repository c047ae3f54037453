"""Building the task registry: built-ins, ``QUIESCE_TASK_MODULES`` and entry points.

A module contributes every ``Task`` among its module-level names. An entry point in
the ``quiesce.tasks`` group may name a module or a single ``Task``. Any failure to
load stops the process at start with a ConfigError naming where it came from, so a
bad deploy never reaches readiness.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from service.config import ConfigError, Settings
from service.egress import EgressPolicy
from service.tasks.base import Task, TaskRegistry
from service.tasks.http import http_task
from service.tasks.sleep import sleep

ENTRY_POINT_GROUP = "quiesce.tasks"


def build_registry(settings: Settings, egress: EgressPolicy | None = None) -> TaskRegistry:
    registry = TaskRegistry()
    registry.add(sleep, origin="built-in")
    policy = egress or EgressPolicy(settings.http_allowed_hosts)
    registry.add(http_task(policy), origin="built-in")
    for module_name in settings.task_modules:
        origin = f"QUIESCE_TASK_MODULES ({module_name})"
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigError(
                f"QUIESCE_TASK_MODULES: cannot import {module_name!r}: {exc}"
            ) from exc
        _add_all(registry, _tasks_in(module), origin)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"entry point {entry_point.name!r} ({entry_point.value})"
        try:
            loaded = entry_point.load()
        except Exception as exc:
            raise ConfigError(f"{ENTRY_POINT_GROUP}: cannot load {origin}: {exc}") from exc
        found = _tasks_in(loaded) if isinstance(loaded, ModuleType) else [loaded]
        _add_all(registry, found, origin)
    return registry


def _tasks_in(module: ModuleType) -> list[Any]:
    return [value for value in vars(module).values() if isinstance(value, Task)]


def _add_all(registry: TaskRegistry, found: list[Any], origin: str) -> None:
    if not found:
        raise ConfigError(f"{origin}: defines no tasks (declare them with @task)")
    for candidate in found:
        if not isinstance(candidate, Task):
            raise ConfigError(f"{origin}: {candidate!r} is not a Task (declare it with @task)")
        try:
            registry.add(candidate, origin=origin)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
