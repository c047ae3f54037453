"""The wire and storage schemas: msgspec Structs, and nothing else.

Encoders and decoders are built once here, at import, because building them per
call is the expensive part of msgspec (see its performance tips).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from itertools import accumulate
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

#: ``queued``: an attempt ended with a reason its retry policy lists; the run waits in
#: the pending queue for a replica to adopt it (only runs created with ``retry``).
RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: Final = frozenset({"succeeded", "failed", "cancelled"})

#: Why a run did not succeed. ``cancelled`` goes with status ``cancelled``; the
#: others with status ``failed``.
FailureReason = Literal["error", "timeout", "shutdown", "worker_lost", "cancelled"]

TaskName = Annotated[
    str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
]
MetadataKey = Annotated[str, Meta(min_length=1, max_length=63)]
MetadataValue = Annotated[str, Meta(max_length=1024)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=64)]
#: A week: a longer deadline is almost certainly a unit mistake (ms for s).
MAX_TIMEOUT_SECONDS: Final = 7 * 24 * 3600.0


def utcnow() -> datetime:
    return datetime.now(UTC)


#: The reasons an attempt may end with and be retried for (never a user's cancel).
RetryReason = Literal["shutdown", "worker_lost", "timeout", "error"]
DEFAULT_RETRY_ON: Final[tuple[RetryReason, ...]] = ("shutdown", "worker_lost")
MAX_ATTEMPTS: Final = 10


class RetryPolicy(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Opt-in retries: an attempt that ends with a reason in ``on`` is run again, on
    whichever replica adopts it, up to ``max_attempts`` attempts in all."""

    max_attempts: Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS)]
    on: Annotated[list[RetryReason], Meta(min_length=1, max_length=4)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_RETRY_ON)
    )

    def retries(self, reason: str, attempt: int) -> bool:
        """Whether an attempt numbered ``attempt`` that ended with ``reason`` runs again."""
        return reason in self.on and attempt < self.max_attempts


class CreateRunRequest(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/runs``. Only ``task`` is required."""

    task: TaskName
    #: Validated against the task's own input Struct before the run is admitted.
    input: dict[str, Any] = {}
    timeout_seconds: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_SECONDS)] | None = None
    callback_url: Annotated[str, Meta(min_length=1, max_length=2048)] | None = None
    metadata: Metadata = {}
    #: Opt-in retries (default: the task's own policy, if it declares one; else none).
    retry: RetryPolicy | None = None


class RunError(Struct, kw_only=True, frozen=True):
    reason: FailureReason
    message: str


class RunRecord(Struct, kw_only=True, frozen=True):
    """The durable state of one run, as ``GET /v1/runs/{run_id}`` returns it."""

    run_id: str
    task: str
    status: RunStatus
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    worker_id: str
    metadata: dict[str, str] = {}
    timeout_seconds: float
    callback_url: str | None = None
    output: Any = None
    error: RunError | None = None
    #: The attempt running now, or — while ``queued`` — the attempts made so far.
    attempt: int = 1
    max_attempts: int = 1
    retry: RetryPolicy | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


# --- events ------------------------------------------------------------------
# Events are a tagged union on "type". ``id`` is the cursor the store assigned; it is
# empty until the event has been appended.


class RunStartedData(Struct, kw_only=True, frozen=True):
    worker_id: str
    attempt: int = 1


class RunRequeuedData(Struct, kw_only=True, frozen=True):
    #: The attempt that ended.
    attempt: int
    reason: RetryReason
    #: The worker that ran it.
    worker_id: str


class RunSucceededData(Struct, kw_only=True, frozen=True):
    output: Any


class RunFailedData(Struct, kw_only=True, frozen=True):
    reason: FailureReason
    message: str


class RunCancelledData(Struct, kw_only=True, frozen=True):
    reason: FailureReason


class _Event(Struct, kw_only=True, frozen=True, tag_field="type"):
    id: str = ""
    created_at: datetime


class RunStarted(_Event, tag="run_started", frozen=True):
    data: RunStartedData


class RunProgress(_Event, tag="run_progress", frozen=True):
    data: dict[str, Any]


class RunRequeued(_Event, tag="run_requeued", frozen=True):
    data: RunRequeuedData


class RunSucceeded(_Event, tag="run_succeeded", frozen=True):
    data: RunSucceededData


class RunFailed(_Event, tag="run_failed", frozen=True):
    data: RunFailedData


class RunCancelled(_Event, tag="run_cancelled", frozen=True):
    data: RunCancelledData


Event = RunStarted | RunProgress | RunRequeued | RunSucceeded | RunFailed | RunCancelled
TerminalEvent = RunSucceeded | RunFailed | RunCancelled
TERMINAL_EVENT_TYPES: Final = (RunSucceeded, RunFailed, RunCancelled)
#: Every event's ``type`` tag.
EVENT_TYPES: Final = frozenset(
    str(cls.__struct_config__.tag)
    for cls in (RunStarted, RunProgress, RunRequeued, *TERMINAL_EVENT_TYPES)
)


def event_type(event: Event) -> str:
    """The ``type`` tag of an event (``run_started``, ...)."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def is_terminal_event(event: Event) -> bool:
    return isinstance(event, TERMINAL_EVENT_TYPES)


def terminal_event_for(record: RunRecord) -> TerminalEvent:
    """The one terminal event that goes with a terminal record."""
    when = record.finished_at or record.updated_at
    if record.status == "succeeded":
        return RunSucceeded(created_at=when, data=RunSucceededData(output=record.output))
    assert record.error is not None, "a failed or cancelled record carries its error"
    if record.status == "cancelled":
        return RunCancelled(created_at=when, data=RunCancelledData(reason=record.error.reason))
    return RunFailed(
        created_at=when,
        data=RunFailedData(reason=record.error.reason, message=record.error.message),
    )


class EventPage(Struct, kw_only=True, frozen=True):
    """Body of ``GET /v1/runs/{run_id}/events``; ``next_cursor`` is the last id (or the
    ``after`` given when the page is empty), to pass as ``after`` next time."""

    events: list[Event]
    next_cursor: str | None


class TaskInfo(Struct, kw_only=True, frozen=True):
    name: str
    description: str
    input_schema: dict[str, Any]


class TaskList(Struct, kw_only=True, frozen=True):
    tasks: list[TaskInfo]


# --- error bodies (documentation: service.web.errors builds them as dicts) -----


class ErrorItem(Struct, kw_only=True, frozen=True):
    """What is wrong, and where: ``key`` is the field or parameter, ``source`` where
    it was (``body``, ``query``, ``header``, ``path``)."""

    message: str
    key: str | None = None
    source: str | None = None


class ErrorBody(Struct, kw_only=True, frozen=True):
    """Every error response: Litestar's shape, whether from the service or the framework."""

    status_code: int
    detail: str
    extra: list[ErrorItem] | dict[str, Any] | None = None


# --- replica state (GET /admin/state) ------------------------------------------


class ActiveRunInfo(Struct, kw_only=True, frozen=True):
    run_id: str
    task: str
    age_seconds: float


class DrainInfo(Struct, kw_only=True, frozen=True):
    trigger: str | None
    started_at: datetime
    grace_seconds: float
    #: When the grace ends and whatever still runs is cancelled.
    cancel_at: datetime
    active_at_start: int
    active_now: int
    cancelled: int
    finished: bool
    #: Runs whose terminal write did not complete by the end of the drain (the store
    #: was unreachable); a peer reaps them once this worker's lease expires.
    left_running: int = 0


LifecycleState = Literal["starting", "ready", "draining", "stopped"]


class ReplicaState(Struct, kw_only=True, frozen=True):
    state: LifecycleState
    worker_id: str
    active_runs: list[ActiveRunInfo]
    active_count: int
    max_active_runs: int
    drain: DrainInfo | None = None


# --- codecs ------------------------------------------------------------------

json_encoder: Final = msgspec.json.Encoder()
record_decoder: Final = msgspec.json.Decoder(RunRecord)
event_decoder: Final = msgspec.json.Decoder(Event)
request_decoder: Final = msgspec.json.Decoder(CreateRunRequest)


_ERROR_PATH_RE: Final = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED_FIELD_RE: Final = re.compile(r"field `([^`]+)`")


def describe_validation_error(
    exc: msgspec.ValidationError, parent: str = ""
) -> tuple[str, str | None]:
    """(message, key) for a 400: the message ends with the JSON path, and the key is
    the offending field as a dotted path. ``parent`` places it under a field (a task's
    input is validated on its own, but lives at ``$.input``). msgspec reports a missing
    or unknown field at its parent object; the key names the field itself."""
    text = str(exc)
    match = _ERROR_PATH_RE.search(text)
    message = text if match is None else text[: match.start()]
    path = ".".join(part for part in (parent, (match["path"] if match else "").lstrip(".")) if part)
    named = _NAMED_FIELD_RE.search(message)
    key = ".".join(part for part in (path, named.group(1) if named else "") if part) or None
    return f"{message} - at `${'.' + path if path else ''}`", key


#: A JSON string, escapes included (the unrolled form: no backtracking).
_JSON_STRING_RE: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: Every byte but the four brackets, to delete them all in one C call.
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
#: How each bracket moves the depth (indexed by byte value).
_DEPTH_STEP: Final = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True when the JSON ``body`` nests arrays/objects more than ``limit`` deep.

    msgspec decodes recursively, and about 1,000 levels raise RecursionError, so a
    create body is checked before it is decoded. The common case costs two
    ``bytes.count`` calls: a body with no more brackets than the limit cannot nest
    deeper. Otherwise strings are cut out (brackets inside them do not nest) and the
    running depth of what is left is taken, all in C-level loops. A malformed body
    may be misjudged either way; the decoder refuses it next anyway.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING_RE.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) > limit


def create_request_json_schema() -> dict[str, Any]:
    """The JSON Schema of the create body, as msgspec (which enforces it) states it:
    the constraints and ``additionalProperties: false`` come from the Struct itself."""
    schema = msgspec.json.schema(CreateRunRequest)
    definitions = schema["$defs"]
    definition: dict[str, Any] = definitions["CreateRunRequest"]
    # Nested Structs (``retry``) are inlined: the body's schema is used on its own.
    for name, prop in definition["properties"].items():
        definition["properties"][name] = _inline(prop, definitions)
    return definition


def _inline(schema: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(definitions[ref.removeprefix("#/$defs/")], definitions)
        return {key: _inline(value, definitions) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, definitions) for item in schema]
    return schema


def request_fingerprint(request: CreateRunRequest) -> str:
    """A digest of a create request that ignores key order and whitespace.

    Idempotency compares bodies by meaning, so a client that re-serializes the same
    request differently still gets its original response back.
    """
    fields = msgspec.to_builtins(request)
    if fields.get("retry") is None:
        # A body without ``retry`` keeps the digest it had before retries existed, so a
        # repeat sent across an upgrade still replays.
        fields.pop("retry", None)
    canonical = msgspec.json.encode(fields, order="sorted")
    return hashlib.sha256(canonical).hexdigest()
