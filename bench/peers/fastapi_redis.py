"""The seed's stack: FastAPI + pydantic + redis-py, persisting a create naively.

``POST /v1/runs`` validates the body and the task's input with pydantic, claims the
``Idempotency-Key`` (SET NX, one round trip), then writes the run's record and its
``run_started`` event (one MULTI/EXEC pipeline) and only then answers 202 with the
record — the durability of Quiesce's create. A key seen before answers with the
original record (same body), 422 (another body) or 409 (still being admitted). No run
is executed.

Run: ``BENCH_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn fastapi_redis:app`` (with
``bench/peers`` on the import path).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated

import redis.asyncio as redis
from fastapi import FastAPI, Header, HTTPException, Request, Response
from peer_models import (
    DEFAULT_TIMEOUT_SECONDS,
    IDEMPOTENCY_KEY,
    INPUTS,
    RETENTION_SECONDS,
    CreateRun,
    RunRecord,
)
from pydantic import ValidationError

WORKER_ID = "fastapi-redis"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The default connection pool (up to 100 connections), as an app would open it.
    app.state.redis = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    yield
    await app.state.redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/runs", status_code=202, response_model=RunRecord)
async def create_run(
    body: CreateRun,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(**IDEMPOTENCY_KEY)] = None,
) -> RunRecord:
    input_model = INPUTS.get(body.task)
    if input_model is None:
        raise HTTPException(422, f"unknown task {body.task!r}")
    try:
        input_model.model_validate(body.input)
    except ValidationError as exc:
        raise HTTPException(400, exc.errors(include_url=False)) from exc
    db: redis.Redis = request.app.state.redis
    if idempotency_key is None:
        run_id = "run_" + secrets.token_hex(13)
    else:
        run_id = "run_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:26]
        fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
        claim = f"idempotency:{idempotency_key}"
        if not await db.set(claim, fingerprint, nx=True, ex=RETENTION_SECONDS):
            return await replay(db, claim, fingerprint, run_id, response)
    now = datetime.now(UTC)
    record = RunRecord(
        run_id=run_id,
        task=body.task,
        status="running",
        created_at=now,
        updated_at=now,
        worker_id=WORKER_ID,
        metadata=body.metadata,
        timeout_seconds=body.timeout_seconds or DEFAULT_TIMEOUT_SECONDS,
        callback_url=body.callback_url,
    )
    started = {"type": "run_started", "data": {"worker_id": WORKER_ID, "attempt": 1}}
    async with db.pipeline(transaction=True) as pipe:
        fields = {"record": record.model_dump_json(), "status": "running"}
        pipe.hset(f"run:{run_id}", mapping=fields)
        pipe.expire(f"run:{run_id}", RETENTION_SECONDS)
        pipe.xadd(f"run:{run_id}:events", {"event": json.dumps(started)}, maxlen=1000)
        pipe.expire(f"run:{run_id}:events", RETENTION_SECONDS)
        await pipe.execute()
    response.headers["Location"] = f"/v1/runs/{run_id}"
    return record


async def replay(
    db: redis.Redis, claim: str, fingerprint: str, run_id: str, response: Response
) -> RunRecord:
    """The key was used before: the same body gets the original record again."""
    if await db.get(claim) != fingerprint.encode():
        raise HTTPException(422, "the idempotency key was used with a different request body")
    raw = await db.hget(f"run:{run_id}", "record")
    if raw is None:
        raise HTTPException(409, "a request with this idempotency key is being admitted")
    response.headers["Location"] = f"/v1/runs/{run_id}"
    return RunRecord.model_validate_json(raw)
