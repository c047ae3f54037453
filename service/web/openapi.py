"""What the OpenAPI document says beyond what Litestar infers from the handlers.

Litestar documents a handler's success response and its parameters. Everything else a
client can get back is stated here, once: each error status with the one error body
shape, the ``Retry-After`` and ``WWW-Authenticate`` headers, the bearer scheme, the
create body as msgspec (which enforces it) describes it, and the links from a created
run to the operations on it (what a stateful API tester follows to reach real runs).
Tests read ``/schema/openapi.json`` and check each of these facts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from litestar.enums import ParamType
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    Components,
    Link,
    OpenAPI,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    PathItem,
    Reference,
    RequestBody,
    Schema,
    SecurityScheme,
)

from service.schemas import EVENT_TYPES, ErrorBody, create_request_json_schema
from service.tasks.base import TaskRegistry

BEARER: Final = "bearer"
#: The security requirement of ``/v1`` and ``/admin`` (probes and metrics carry none).
SECURITY: Final[list[dict[str, list[str]]]] = [{BEARER: []}]
COMPONENTS: Final = Components(
    security_schemes={
        BEARER: SecurityScheme(
            type="http",
            scheme="bearer",
            description=(
                "`Authorization: Bearer <QUIESCE_API_TOKEN>`. Without a configured token "
                "only loopback clients are served."
            ),
        )
    }
)

CREATE_RUN: Final = "createRun"
GET_RUN: Final = "getRun"
LIST_EVENTS: Final = "listEvents"
STREAM_EVENTS: Final = "streamEvents"
CANCEL_RUN: Final = "cancelRun"
_TASK_INPUT_PREFIX: Final = "TaskInput_"
_TASK_INPUT_REF: Final = "#/components/schemas/" + _TASK_INPUT_PREFIX + "{name}"

#: What each error status means, unless an operation says more precisely.
_ERROR_DESCRIPTIONS: Final[Mapping[int, str]] = {
    400: "The request is invalid; `extra[0]` names the field or parameter (`key`) and "
    "where it is (`source`: body, query, header or path).",
    401: "No valid bearer token (or, with no token configured, a client not on loopback).",
    404: "No such run, or it has expired.",
    408: "The request body did not arrive in time.",
    409: "Conflict.",
    413: "The body is larger than the limit (1 MiB).",
    415: "The body is not JSON (`Content-Type: application/json`).",
    422: "Unprocessable.",
    429: "This replica runs as many runs as it may; retry after `Retry-After` seconds.",
    503: "The replica is draining or its store is unavailable; retry after `Retry-After` "
    "seconds (on another replica when draining).",
}

_RETRY_AFTER: Final = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER, minimum=1),
    description="Seconds to wait before retrying.",
    required=True,
)
_WWW_AUTHENTICATE: Final = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.STRING, const="Bearer"),
    description="The challenge of RFC 6750.",
    required=True,
)
_CREATED_HEADERS: Final = {
    "Location": OpenAPIHeader(
        schema=Schema(type=OpenAPIType.STRING),
        description="`/v1/runs/{run_id}`: where the run is.",
        required=True,
    ),
    "Idempotent-Replayed": OpenAPIHeader(
        schema=Schema(type=OpenAPIType.STRING, const="true"),
        description="Present when this is the original response to an earlier request "
        "with the same Idempotency-Key.",
    ),
}
#: The create's Idempotency-Key header. The handler reads it from the headers (checked
#: in before_request with the same constraints), so it is documented here.
IDEMPOTENCY_KEY_MAX_LENGTH: Final = 255
IDEMPOTENCY_KEY_PATTERN: Final = r"^[!-~]+$"
_IDEMPOTENCY_KEY_DESCRIPTION: Final = (
    "Repeat a create safely: the same key and body return the original run "
    "(1 to 255 visible ASCII characters)."
)
_IDEMPOTENCY_KEY: Final = Parameter(
    name="Idempotency-Key",
    param_in=ParamType.HEADER,
    schema=Schema(
        type=OpenAPIType.STRING,
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX_LENGTH,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description=_IDEMPOTENCY_KEY_DESCRIPTION,
    ),
    description=_IDEMPOTENCY_KEY_DESCRIPTION,
    required=False,
)
_HEADERS: Final[Mapping[str, dict[str, OpenAPIHeader]]] = {
    "401": {"WWW-Authenticate": _WWW_AUTHENTICATE},
    "429": {"Retry-After": _RETRY_AFTER},
    "503": {"Retry-After": _RETRY_AFTER},
}


def error_responses(codes: Iterable[int], **descriptions: str) -> dict[int, ResponseSpec]:
    """``responses=`` for a route: each status in ``codes`` with the error body.

    ``descriptions`` refines the wording for this operation, keyed ``e409=...``.
    """
    return {
        code: ResponseSpec(
            data_container=ErrorBody,
            generate_examples=False,
            description=descriptions.get(f"e{code}", _ERROR_DESCRIPTIONS[code]),
        )
        for code in codes
    }


def _create_links() -> dict[str, Link | Reference]:
    run_id = {"run_id": "$response.body#/run_id"}
    return {
        "GetRun": Link(operation_id=GET_RUN, parameters=run_id, description="Read the run."),
        "ListEvents": Link(
            operation_id=LIST_EVENTS, parameters=run_id, description="Page its events."
        ),
        "StreamEvents": Link(
            operation_id=STREAM_EVENTS, parameters=run_id, description="Follow its events."
        ),
        "CancelRun": Link(operation_id=CANCEL_RUN, parameters=run_id, description="Cancel it."),
    }


@dataclass
class _Verbatim(Schema):
    """A JSON Schema given as a dict (msgspec's), rendered as it is."""

    raw: dict[str, Any] | None = None

    def to_schema(self) -> dict[str, Any]:
        return dict(self.raw or {})


def create_body_schemas(registry: TaskRegistry) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the create body's schema, the components it refers to).

    The body is one of the registered tasks: ``task`` names it and ``input`` follows
    that task's input Struct (required when the Struct has required fields, since an
    omitted input is ``{}``). Everything comes from msgspec's own JSON Schema of the
    Structs that validate the body, so the document cannot promise what is refused.
    """
    tasks = list(registry)
    refs, components = msgspec.json.schema_components(
        [t.input_type for t in tasks], ref_template=_TASK_INPUT_REF
    )
    base = create_request_json_schema()
    branches = []
    for task, ref in zip(tasks, refs, strict=True):
        properties = {
            **base["properties"],
            "task": {"const": task.name, "description": task.description.split("\n")[0]},
            "input": ref,
        }
        required = ["task"]
        if components[ref["$ref"].removeprefix(_TASK_INPUT_REF.format(name=""))].get("required"):
            required.append("input")
        branches.append(
            {
                "title": f"Run {task.name}",
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            }
        )
    body = {
        "title": base.get("title"),
        "description": "One registered task and its input; unknown fields are refused.",
        "oneOf": branches,
    }
    return body, {f"{_TASK_INPUT_PREFIX}{name}": value for name, value in components.items()}


def complete(openapi: OpenAPI, registry: TaskRegistry) -> None:
    """Add to the document what Litestar does not infer: the create body (documented
    here, so the handler need not decode the body a second time), the headers of
    the responses, one frame of the event stream, and the links from a created run.
    Called once per app."""
    body, components = create_body_schemas(registry)
    schemas = openapi.components.schemas
    for name, schema in components.items():
        schemas[name] = _Verbatim(raw=schema)
    for path_item in (openapi.paths or {}).values():
        for operation in _operations(path_item):
            _add_headers(operation)
            if operation.operation_id == STREAM_EVENTS:
                frames = (operation.responses or {}).get("200")
                if isinstance(frames, OpenAPIResponse) and frames.content:
                    frames.content["text/event-stream"].schema = _Verbatim(
                        raw=_sse_frame_schema(openapi)
                    )
            if operation.operation_id == CREATE_RUN:
                operation.parameters = [*(operation.parameters or []), _IDEMPOTENCY_KEY]
                operation.request_body = RequestBody(
                    required=True,
                    description=body["description"],
                    content={"application/json": OpenAPIMediaType(schema=_Verbatim(raw=body))},
                )
                accepted = (operation.responses or {}).get("202")
                if isinstance(accepted, OpenAPIResponse):
                    accepted.links = _create_links()
                    accepted.headers = {**(accepted.headers or {}), **_CREATED_HEADERS}


def _sse_frame_schema(openapi: OpenAPI) -> dict[str, Any]:
    """One Server-Sent Events frame of the stream: ``data`` is an event as JSON, the
    same as an item of an event page (OpenAPI 3.1 reads ``schema`` per event)."""
    page = openapi.components.schemas["EventPage"].to_schema()
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "The event's cursor (resume from it)."},
            "event": {"enum": sorted(EVENT_TYPES), "description": "The event's type."},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": page["properties"]["events"]["items"],
            },
            "retry": {
                "type": "integer",
                "minimum": 0,
                "description": "Sent when the replica ends the stream early (drain, store "
                "trouble): reconnect after this many milliseconds with Last-Event-ID.",
            },
        },
    }


def _operations(path_item: PathItem) -> list[Operation]:
    candidates = (path_item.get, path_item.post, path_item.put, path_item.patch, path_item.delete)
    return [operation for operation in candidates if operation is not None]


def _add_headers(operation: Operation) -> None:
    for status, response in (operation.responses or {}).items():
        headers = _HEADERS.get(status)
        if headers is not None and isinstance(response, OpenAPIResponse):
            response.headers = {**(response.headers or {}), **headers}
