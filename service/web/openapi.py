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

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    Components,
    Link,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
    SecurityScheme,
)

from service.schemas import ErrorBody, create_request_json_schema

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


def _request_bodies() -> dict[str, RequestBody]:
    return {
        CREATE_RUN: RequestBody(
            required=True,
            description="The run to create. Unknown fields are refused.",
            content={
                "application/json": OpenAPIMediaType(
                    schema=_Verbatim(raw=create_request_json_schema())
                )
            },
        )
    }


@dataclass
class _Verbatim(Schema):
    """A JSON Schema given as a dict, rendered as it is."""

    raw: dict[str, Any] | None = None

    def to_schema(self) -> dict[str, Any]:
        return dict(self.raw or {})


@dataclass
class DocumentedOperation(Operation):
    """The operation Litestar builds, completed: headers of the error responses, the
    create body (documented here so the handler need not decode the body a second
    time) and the links from a created run."""

    def __post_init__(self) -> None:
        for status, response in (self.responses or {}).items():
            headers = _HEADERS.get(status)
            if headers is not None and isinstance(response, OpenAPIResponse):
                response.headers = {**(response.headers or {}), **headers}
        if self.operation_id == CREATE_RUN:
            self.request_body = _request_bodies()[CREATE_RUN]
            accepted = (self.responses or {}).get("202")
            if isinstance(accepted, OpenAPIResponse):
                accepted.links = _create_links()
                accepted.headers = {**(accepted.headers or {}), **_CREATED_HEADERS}
