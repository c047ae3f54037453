"""Tasks: what a run executes. See ``service.tasks.base`` for how to write one."""

from service.schemas import RetryPolicy
from service.tasks.base import RunContext, RunContexts, Task, TaskRegistry, task

__all__ = ["RetryPolicy", "RunContext", "RunContexts", "Task", "TaskRegistry", "task"]
