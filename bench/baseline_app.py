"""The no-persistence yardstick for ``create_throughput.py``.

A minimal Litestar app (loaded by Granian with ``--factory``) whose ``POST /v1/runs``
does what a create must do before any persistence — check the content type, decode
the body strictly into ``service.schemas.CreateRunRequest`` (the same decoder the
service uses) and validate ``input`` against the task's input Struct — and then
answers 202 with a small JSON body. No store, no scheduler, no run execution,
no metrics: what is left is the cost of Granian, Litestar and msgspec alone.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, post

from service.schemas import request_decoder
from service.tasks.sleep import SleepInput

_ACCEPTED = msgspec.json.Encoder()
_INPUTS: dict[str, type[msgspec.Struct]] = {"sleep": SleepInput}


def _refuse(status: int, detail: str) -> Response[bytes]:
    body = _ACCEPTED.encode({"status_code": status, "detail": detail})
    return Response(body, status_code=status, media_type="application/json")


@post("/v1/runs", status_code=202)
async def create_run(request: Request[Any, Any, Any]) -> Response[bytes]:
    media_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        return _refuse(415, "the body must be JSON")
    try:
        create = request_decoder.decode(await request.body())
        input_type = _INPUTS.get(create.task)
        if input_type is None:
            return _refuse(422, f"unknown task {create.task!r}")
        msgspec.convert(create.input, input_type, strict=True)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return _refuse(400, str(exc))
    run_id = "run_" + secrets.token_hex(13)
    body = _ACCEPTED.encode({"run_id": run_id, "task": create.task, "status": "running"})
    return Response(
        body,
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/v1/runs/{run_id}"},
    )


def create_app() -> Litestar:
    return Litestar(route_handlers=[create_run], logging_config=None, openapi_config=None)
