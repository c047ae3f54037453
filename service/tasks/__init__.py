"""Tasks: what a run executes. See ``service.tasks.base`` for how to write one."""

from service.tasks.base import RunContext, RunContexts, Task, TaskRegistry, task

__all__ = ["RunContext", "RunContexts", "Task", "TaskRegistry", "task"]
