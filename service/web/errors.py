"""The one place where the service's errors become HTTP responses.

Bodies keep Litestar's shape, ``{"status_code": N, "detail": "...", "extra": ...}``,
so clients parse one format whether the error came from us or from the framework.
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import Send

from service.errors import (
    AtCapacity,
    Draining,
    IdempotencyInProgress,
    IdempotencyMismatch,
    InvalidCursor,
    InvalidInput,
    QuiesceError,
    RunAlreadyFinished,
    RunNotFound,
    StoreUnavailable,
    Unavailable,
    UnknownTask,
)
from service.schemas import json_encoder
from service.web.http_metrics import count_unmatched

log = structlog.get_logger(__name__)

_STATUS: Final[dict[type[QuiesceError], int]] = {
    InvalidInput: 400,
    InvalidCursor: 400,
    RunNotFound: 404,
    RunAlreadyFinished: 409,
    IdempotencyInProgress: 409,
    IdempotencyMismatch: 422,
    UnknownTask: 422,
    AtCapacity: 429,
    Draining: 503,
    StoreUnavailable: 503,
}


def status_for(exc: QuiesceError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def error_response(
    status_code: int,
    detail: str,
    *,
    extra: Any = None,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {"status_code": status_code, "detail": detail}
    if extra:
        body["extra"] = extra
    return Response(content=body, status_code=status_code, headers=headers)


def invalid_request(
    message: str, key: str | None, source: str = "body"
) -> Response[dict[str, Any]]:
    """A 400 that names the offending field, in the shape Litestar's validation uses."""
    item: dict[str, str] = {"message": message, "source": source}
    if key:
        item["key"] = key
    return error_response(400, message, extra=[item])


def handle_quiesce_error(request: Request[Any, Any, Any], exc: QuiesceError) -> Response[Any]:
    status_code = status_for(exc)
    if isinstance(exc, InvalidInput):
        return invalid_request(exc.message, exc.extra.get("field"), exc.extra.get("source", "body"))
    if isinstance(exc, InvalidCursor):
        # The store's error names no parameter: ``after`` unless the route said otherwise.
        return invalid_request(
            exc.message, exc.extra.get("field", "after"), exc.extra.get("source", "query")
        )
    headers = None
    if isinstance(exc, Unavailable):
        headers = {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, StoreUnavailable):
        log.warning("store_unavailable", path=request.url.path, error=exc.message)
    return error_response(status_code, exc.message, extra=exc.extra or None, headers=headers)


async def after_exception(exc: Exception, scope: Any) -> None:
    """after_exception hook: count unmatched requests; log what becomes a 500."""
    count_unmatched(exc, scope)
    if not isinstance(exc, QuiesceError | HTTPException):
        log.error("unhandled_exception", path=scope.get("path"), exc_info=exc)


async def send_error(
    send: Send, status_code: int, detail: str, *headers: tuple[bytes, bytes]
) -> None:
    """An error answered by ASGI middleware (before Litestar routes the request), in
    the shape of every other error."""
    body = json_encoder.encode({"status_code": status_code, "detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
