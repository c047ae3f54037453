"""What a task is, what it receives, and the registry that names them.

A task is an async function ``fn(ctx, params)`` registered under a name, where
``params`` is an instance of the task's own msgspec Struct. Write one like this::

    import msgspec
    from service.tasks import RunContext, task

    class Greet(msgspec.Struct, forbid_unknown_fields=True):
        name: str

    @task("greet")
    async def greet(ctx: RunContext, params: Greet) -> dict[str, str]:
        await ctx.emit({"stage": "greeting"})
        return {"greeting": f"hello {params.name}"}

and name its module in ``QUIESCE_TASK_MODULES`` or in a ``quiesce.tasks`` entry point.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar, get_type_hints

import httpx
import msgspec
import structlog

from service.errors import InvalidInput, UnknownTask
from service.schemas import RetryPolicy, describe_validation_error

ParamsT = TypeVar("ParamsT", bound=msgspec.Struct)
TaskFn = Callable[["RunContext", ParamsT], Coroutine[Any, Any, Any]]


class RunContext:
    """What a running task may use. One is made per run (by :class:`RunContexts`)."""

    __slots__ = ("_emit", "attempt", "deadline", "http", "log", "run_id")

    def __init__(
        self,
        *,
        run_id: str,
        emit: Callable[[dict[str, Any]], Awaitable[bool]],
        http: httpx.AsyncClient,
        log: structlog.typing.FilteringBoundLogger,
        deadline: datetime,
        attempt: int = 1,
    ) -> None:
        self.run_id = run_id
        #: 1 for the first attempt; more for a run retried under its ``retry`` policy
        #: (a task that is not idempotent as a whole can skip what an earlier attempt did).
        self.attempt = attempt
        #: The process-wide HTTP client: reuse its connections, do not close it.
        self.http = http
        #: A logger with ``run_id`` and ``task`` bound.
        self.log = log
        #: When this attempt times out (UTC); the task is cancelled at that moment.
        self.deadline = deadline
        self._emit = emit

    async def emit(self, data: dict[str, Any]) -> bool:
        """Append a ``run_progress`` event with ``data`` (any JSON object).

        Returns False when the run has already ended (the event is dropped). The event
        is queued and written in order; a store outage does not reach the task (the
        write is retried until the run's deadline), but when many events are waiting,
        ``emit`` waits for room.
        """
        return await self._emit(data)


class RunContexts:
    """Makes each run's :class:`RunContext`.

    It holds what every run shares — the process's HTTP client — so that the
    scheduler, which only asks for a context, knows nothing of HTTP clients.
    """

    __slots__ = ("_http",)

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    def make(
        self,
        *,
        run_id: str,
        emit: Callable[[dict[str, Any]], Awaitable[bool]],
        log: structlog.typing.FilteringBoundLogger,
        deadline: datetime,
        attempt: int = 1,
    ) -> RunContext:
        return RunContext(
            run_id=run_id, emit=emit, http=self._http, log=log, deadline=deadline, attempt=attempt
        )


@dataclass(frozen=True, slots=True)
class Task(Generic[ParamsT]):
    """A registered task: its name, its function and the Struct of its input."""

    name: str
    fn: TaskFn[ParamsT]
    input_type: type[ParamsT]
    description: str = ""
    #: Extra admission checks that need more than the Struct's own validation;
    #: raise InvalidInput with ``field`` set to refuse the input.
    check: Callable[[ParamsT], None] | None = field(default=None, compare=False)
    #: The retry policy of a create that names none (None: no retries unless asked).
    #: Declare one only for a task that is safe to run again from the start.
    retry: RetryPolicy | None = None

    def parse_input(self, raw: dict[str, Any]) -> ParamsT:
        """Validate a create request's ``input`` (InvalidInput names the field path)."""
        try:
            params = msgspec.convert(raw, self.input_type)
        except msgspec.ValidationError as exc:
            message, key = describe_validation_error(exc, parent="input")
            raise InvalidInput(message, field=key) from None
        if self.check is not None:
            self.check(params)
        return params

    def input_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = msgspec.json.schema(self.input_type)
        return schema


def task(
    name: str,
    *,
    description: str | None = None,
    check: Callable[[Any], None] | None = None,
    retry: RetryPolicy | None = None,
) -> Callable[[TaskFn[Any]], Task[Any]]:
    """Declare a task; the input Struct is read from the annotation of ``params``.

    ``retry`` is the task's default retry policy (a create's own ``retry`` wins), e.g.
    ``retry=RetryPolicy(max_attempts=3)`` for a task that may safely run again.
    """

    def declare(fn: TaskFn[Any]) -> Task[Any]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"task {name!r}: {fn.__qualname__} must be an async function")
        parameters = list(inspect.signature(fn).parameters)
        if len(parameters) != 2:
            raise TypeError(f"task {name!r}: {fn.__qualname__} must take (ctx, params)")
        input_type = get_type_hints(fn).get(parameters[1])
        if not (isinstance(input_type, type) and issubclass(input_type, msgspec.Struct)):
            raise TypeError(f"task {name!r}: annotate {parameters[1]!r} with a msgspec.Struct")
        doc = description if description is not None else inspect.getdoc(fn) or ""
        return Task(
            name=name, fn=fn, input_type=input_type, description=doc, check=check, retry=retry
        )

    return declare


class TaskRegistry:
    """The tasks this process can run, by name."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task[Any]] = {}
        self._origins: dict[str, str] = {}

    def add(self, task: Task[Any], *, origin: str) -> None:
        existing = self._origins.get(task.name)
        if existing is not None:
            raise ValueError(
                f"task {task.name!r} from {origin} is already registered by {existing}"
            )
        self._tasks[task.name] = task
        self._origins[task.name] = origin

    def get(self, name: str) -> Task[Any]:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(f"unknown task {name!r}", task=name) from None

    def __iter__(self) -> Iterator[Task[Any]]:
        return iter(sorted(self._tasks.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self._tasks)
