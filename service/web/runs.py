"""The run API under ``/v1``: create (the webhook), read, events, stream, cancel, tasks."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Final

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import Stream
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    InvalidCursor,
    InvalidInput,
    QuiesceError,
    RunAlreadyFinished,
    RunNotFound,
)
from service.schemas import (
    CreateRunRequest,
    EventPage,
    RunRecord,
    TaskInfo,
    TaskList,
    describe_validation_error,
    json_depth_exceeds,
    json_encoder,
    request_decoder,
)
from service.store import CancelOutcome
from service.store.base import parse_cursor
from service.web import rejections
from service.web.auth import auth_middleware
from service.web.errors import error_response, invalid_request
from service.web.openapi import (
    CANCEL_RUN,
    CREATE_RUN,
    GET_RUN,
    IDEMPOTENCY_KEY_MAX_LENGTH,
    IDEMPOTENCY_KEY_PATTERN,
    LIST_EVENTS,
    SECURITY,
    STREAM_EVENTS,
    error_responses,
)
from service.web.rejections import COUNTS_REJECTIONS
from service.web.sse import event_stream
from service.web.state import Services, services_of
from service.webhooks import InvalidSignature

RUN_ID_RE: Final = re.compile(r"^run_[a-z2-7]{26}$")
MAX_IDEMPOTENCY_KEY_LENGTH: Final = IDEMPOTENCY_KEY_MAX_LENGTH
#: Visible ASCII only: a key is stored and echoed, so no control characters, no
#: spaces (a proxy may trim or fold them) and nothing a header cannot carry as is.
_IDEMPOTENCY_KEY_RE: Final = re.compile(IDEMPOTENCY_KEY_PATTERN)
_STASH: Final = "quiesce.create"
_CREATE_REQUEST: Final = "create_request"
#: A signed create's ``webhook-id``: its idempotency key, in the webhook key space.
_WEBHOOK_ID: Final = "webhook_id"


class Accepted(Response[RunRecord]):
    """The 202 of a create: the run record, with ``Location`` (and ``Idempotent-Replayed``
    on a replay).

    Rendered straight to its two ASGI messages: the generic path (a headers object
    filled by ``setdefault``, the serializer looked up per response) is a noticeable
    share of the busiest request there is, and this response never needs it.
    """

    def __init__(self, record: RunRecord, *, replayed: bool) -> None:
        super().__init__(record, status_code=202)
        self._replayed = replayed

    # Litestar only calls the returned app (``await response(scope, receive, send)``),
    # so a plain ASGI app stands in for an ASGIResponse here.
    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIApp:  # type: ignore[override]
        record: RunRecord = self.content
        body = json_encoder.encode(record)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"location", f"/v1/runs/{record.run_id}".encode()),
        ]
        if self._replayed:
            headers.append((b"idempotent-replayed", b"true"))
        return _SendOnce(
            {"type": "http.response.start", "status": 202, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False},
        )


class _SendOnce:
    """An ASGI app that sends two prepared messages."""

    __slots__ = ("_body", "_start")

    def __init__(self, start: Message, body: Message) -> None:
        self._start = start
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(self._start)
        await send(self._body)


async def _decode_create(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """before_request of the create route: every check of the request before admission.

    Litestar's own body parsing coerces types (``"600"`` becomes ``600.0``) and
    accepts any content type; a webhook should say exactly what is wrong instead. So
    the body is read here (413 when too large), its signature verified when signed
    webhooks are required (401), then its type and headers checked (415, 400) and it
    is decoded strictly (400 naming the field).
    """
    services = services_of(request.app)
    metrics = services.metrics
    try:
        body = await request.body()
    except HTTPException:  # 413: the body is over request_max_body_size
        rejections.count(metrics, "invalid")
        raise
    if services.webhook_key is not None:
        try:
            message_id = services.webhook_key.verify(request.headers, body, now=time.time())
        except InvalidSignature as exc:
            rejections.count(metrics, "unauthorized")
            return error_response(401, f"invalid webhook signature: {exc}")
        # A sender retries a message with the same webhook-id: make that a replay.
        _stash(request)[_WEBHOOK_ID] = message_id
    refusal = _check_headers(request.headers) or _decode_body(request, body, services)
    if refusal is not None:
        rejections.count(metrics, "invalid")
    return refusal


def _stash(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """What before_request hands the create handler, kept in the request's scope
    (``request.state`` builds a State object on each access)."""
    scope: Any = request.scope
    stash: dict[str, Any] | None = scope.get(_STASH)
    if stash is None:
        stash = scope[_STASH] = {}
    return stash


def _check_headers(headers: Any) -> Response[Any] | None:
    media_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        return error_response(415, "the body must be JSON (Content-Type: application/json)")
    key = headers.get("idempotency-key")
    if key is not None and not (
        1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH and _IDEMPOTENCY_KEY_RE.match(key)
    ):
        return invalid_request(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters",
            "Idempotency-Key",
            "header",
        )
    return None


def _decode_body(
    request: Request[Any, Any, Any], body: bytes, services: Services
) -> Response[Any] | None:
    limit = services.settings.max_json_depth
    if json_depth_exceeds(body, limit):
        return invalid_request(
            f"JSON nested deeper than {limit} levels (QUIESCE_MAX_JSON_DEPTH)", None
        )
    try:
        create = request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        return invalid_request(*describe_validation_error(exc))
    except msgspec.DecodeError as exc:
        return invalid_request(str(exc), None)
    except UnicodeDecodeError:
        return invalid_request("the body is not valid UTF-8", None)
    except RecursionError:  # a second line of defence behind the depth limit
        return invalid_request("JSON nested too deeply", None)
    if create.callback_url is not None:
        try:
            services.callbacks.check(create.callback_url)
        except InvalidInput as exc:
            return invalid_request(exc.message, "callback_url")
    _stash(request)[_CREATE_REQUEST] = create
    return None


def _check_run_id(run_id: str) -> None:
    if not RUN_ID_RE.match(run_id):
        # Not echoed: it may be long or hold any character.
        raise RunNotFound("run not found: a run id is run_ and 26 base32 characters")


async def _load(services: Services, run_id: str) -> RunRecord:
    _check_run_id(run_id)
    record = await services.store.get(run_id)
    if record is None:
        raise RunNotFound(f"run {run_id} not found")
    return record


_STREAM_FRAMES: Final = (
    "Server-Sent Events: the run's events from the cursor on, then live. Each event is "
    "a frame `id: <cursor>`, `event: <type>`, `data: <the event as JSON>`; a comment "
    "line (`: keep-alive`) comes at least every 15 s; the stream ends after the terminal "
    "event. A replica that drains (or loses its store) ends it with a `retry:` hint; "
    "reconnect with `Last-Event-ID`."
)


class RunsController(Controller):
    path = "/v1"
    tags = ("runs",)
    middleware = (auth_middleware,)
    security = SECURITY

    @post(
        "/runs",
        status_code=202,
        before_request=_decode_create,
        opt={COUNTS_REJECTIONS: True},
        summary="Create a run (the webhook)",
        operation_id=CREATE_RUN,
        responses=error_responses(
            (400, 401, 408, 409, 413, 415, 422, 429, 503),
            e400="The body or a header is invalid (`extra[0].key` names it); also a "
            "`callback_url` or an `http` task's `url` the egress policy refuses.",
            e401="No valid bearer token, or an invalid webhook signature.",
            e409="The same Idempotency-Key is still being admitted by another request.",
            e422="Unknown task, or the Idempotency-Key was used with a different body.",
        ),
    )
    async def create_run(self, request: Request[Any, Any, Any]) -> Response[RunRecord]:
        # The body was decoded strictly in before_request and the Idempotency-Key
        # checked there (service.web.openapi documents both), so the handler takes
        # no parameters for Litestar to parse again.
        services = services_of(request.app)
        stash = _stash(request)
        create: CreateRunRequest = stash[_CREATE_REQUEST]
        idempotency_key = request.headers.get("idempotency-key")
        # A client's key and a webhook's id live in separate key spaces (see run_id_for_key).
        webhook_id = None if idempotency_key else stash.get(_WEBHOOK_ID)
        try:
            admission = await services.scheduler.create(
                create,
                idempotency_key=webhook_id or idempotency_key,
                key_namespace="webhook" if webhook_id else "client",
            )
        except QuiesceError as exc:
            rejections.count_error(services.metrics, exc)
            raise
        return Accepted(admission.record, replayed=admission.replayed)

    @get(
        "/runs/{run_id:str}",
        summary="Read a run",
        operation_id=GET_RUN,
        responses=error_responses((401, 404, 503)),
    )
    async def get_run(
        self, services: NamedDependency[Services], run_id: FromPath[str]
    ) -> RunRecord:
        return await _load(services, run_id)

    @get(
        "/runs/{run_id:str}/events",
        summary="A page of a run's events, oldest first",
        operation_id=LIST_EVENTS,
        responses=error_responses((400, 401, 404, 503)),
    )
    async def list_events(
        self,
        services: NamedDependency[Services],
        run_id: FromPath[str],
        after: Annotated[str | None, QueryParameter(description="Exclusive cursor.")] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> EventPage:
        _check_run_id(run_id)
        if after is not None:
            parse_cursor(after)
        events = await services.store.events(run_id, after=after, limit=limit)
        if events is None:
            raise RunNotFound(f"run {run_id} not found")
        return EventPage(events=events, next_cursor=events[-1].id if events else after)

    @get(
        "/runs/{run_id:str}/events/stream",
        summary="Server-Sent Events: replay, then live until the terminal event",
        media_type="text/event-stream",
        operation_id=STREAM_EVENTS,
        responses={
            200: ResponseSpec(
                data_container=str,
                generate_examples=False,
                media_type="text/event-stream",
                description=_STREAM_FRAMES,
            ),
            **error_responses(
                (400, 401, 404, 503),
                e503="The store is unavailable, or this replica has as many open streams "
                "as it may (QUIESCE_MAX_STREAMS); retry after `Retry-After` seconds.",
            ),
        },
    )
    async def stream_events(
        self,
        services: NamedDependency[Services],
        run_id: FromPath[str],
        after: Annotated[str | None, QueryParameter(description="Exclusive cursor.")] = None,
        last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
    ) -> Stream:
        # Last-Event-ID wins: a reconnecting EventSource sends it with the original URL.
        cursor = last_event_id or after
        if cursor is not None:
            try:
                parse_cursor(cursor)
            except InvalidCursor as exc:
                if last_event_id:
                    raise InvalidCursor(
                        exc.message, field="Last-Event-ID", source="header"
                    ) from None
                raise
        await _load(services, run_id)
        return Stream(
            event_stream(
                services.store,
                run_id,
                after=cursor,
                draining=services.scheduler.drain.draining,
                feeds=services.feeds,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @post(
        "/runs/{run_id:str}/cancel",
        status_code=202,
        summary="Cancel a run, wherever it runs",
        operation_id=CANCEL_RUN,
        responses={
            200: ResponseSpec(
                data_container=RunRecord,
                generate_examples=False,
                description="The run was already cancelled: its record.",
            ),
            **error_responses(
                (401, 404, 409, 503),
                e409="The run already finished otherwise (`extra.status` says how).",
            ),
        },
    )
    async def cancel_run(
        self, services: NamedDependency[Services], run_id: FromPath[str]
    ) -> Response[RunRecord]:
        _check_run_id(run_id)
        outcome = await services.scheduler.cancel(run_id)
        record = await _load(services, run_id)
        if outcome is CancelOutcome.FINISHED:
            raise RunAlreadyFinished(
                f"run {run_id} already finished with status {record.status}", status=record.status
            )
        status_code = 200 if outcome is CancelOutcome.ALREADY_CANCELLED else 202
        return Response(record, status_code=status_code)

    @get(
        "/tasks",
        summary="Registered tasks and the JSON Schema of each input",
        operation_id="listTasks",
        responses=error_responses((401,)),
    )
    async def list_tasks(self, services: NamedDependency[Services]) -> TaskList:
        return TaskList(
            tasks=[
                TaskInfo(name=t.name, description=t.description, input_schema=t.input_schema())
                for t in services.registry
            ]
        )
