"""``http``: one HTTP request with the shared client, to an allowed host."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from service.egress import EgressPolicy, EgressRefused
from service.errors import InvalidInput
from service.tasks.base import RunContext, Task, task

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class HttpInput(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    url: Annotated[str, Meta(min_length=1, max_length=2048)]
    method: Method = "GET"
    headers: Annotated[dict[str, str], Meta(max_length=64)] = {}
    #: A JSON body; give at most one of ``json`` and ``text``.
    json: Any | UnsetType = UNSET
    text: str | None = None
    timeout_seconds: Annotated[float, Meta(gt=0, le=300)] = 30.0
    #: The response body is cut at this many bytes (``truncated`` says so).
    max_body_bytes: Annotated[int, Meta(ge=0, le=1024 * 1024)] = 64 * 1024

    def __post_init__(self) -> None:
        if self.json is not UNSET and self.text is not None:
            raise ValueError("give at most one of `json` and `text`")


def http_task(policy: EgressPolicy) -> Task[HttpInput]:
    """The ``http`` task, bound to the egress policy of this process."""

    def check(params: HttpInput) -> None:
        try:
            policy.check_url(params.url)
        except EgressRefused as exc:
            raise InvalidInput(f"{exc} - at `$.input.url`", field="input.url") from None

    @task("http", check=check)
    async def http(ctx: RunContext, params: HttpInput) -> dict[str, Any]:
        """Perform one HTTP request; return its status, headers and (truncated) body."""
        target = await policy.pin(params.url)
        content = None if params.text is None else params.text.encode()
        # The Host header is the target's own: it names what the egress policy checked.
        headers = {k: v for k, v in params.headers.items() if k.lower() != "host"}
        headers.update(target.headers)
        if params.json is not UNSET:
            content = msgspec.json.encode(params.json)
            headers.setdefault("content-type", "application/json")
        async with ctx.http.stream(
            params.method,
            target.url,
            headers=headers,
            content=content,
            timeout=params.timeout_seconds,
            follow_redirects=False,
            extensions=target.extensions,
        ) as response:
            body = bytearray()
            truncated = False
            async for chunk in response.aiter_bytes():
                room = params.max_body_bytes - len(body)
                if len(chunk) > room:
                    body += chunk[:room]
                    truncated = True
                    break
                body += chunk
        return {
            "status": response.status_code,
            "headers": dict(response.headers),
            "body": body.decode("utf-8", errors="replace"),
            "truncated": truncated,
        }

    return http
