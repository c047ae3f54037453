"""Tasks: what a run executes. See ``service.tasks.base`` for how to write one."""

from service.tasks.base import RunContext, Task, TaskRegistry, task

__all__ = ["RunContext", "Task", "TaskRegistry", "task"]
