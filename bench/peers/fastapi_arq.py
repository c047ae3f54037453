"""FastAPI enqueueing to arq: the create is a job in arq's queue, run by a worker.

``POST /v1/runs`` validates the body and the task's input with pydantic and enqueues
an arq job whose id is the ``Idempotency-Key`` (arq refuses a second job with the
same id while the first, or its result, is kept: answered 409). arq writes the job
and adds it to its queue in one MULTI/EXEC before the 202. A separate worker process
(``WorkerSettings``) runs the jobs.

Run: ``BENCH_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn fastapi_arq:app`` and
``BENCH_REDIS_URL=... python -m arq fastapi_arq.WorkerSettings`` (with ``bench/peers``
on the import path).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from arq.worker import func
from fastapi import FastAPI, Header, HTTPException, Request
from peer_models import IDEMPOTENCY_KEY, INPUTS, CreateRun
from pydantic import BaseModel, ValidationError


def redis_settings() -> RedisSettings:
    return RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"])


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.arq = await create_pool(redis_settings())
    yield
    await app.state.arq.aclose()


app = FastAPI(lifespan=lifespan)


class Accepted(BaseModel):
    run_id: str
    task: str
    status: str


@app.post("/v1/runs", status_code=202, response_model=Accepted)
async def create_run(
    body: CreateRun,
    request: Request,
    idempotency_key: Annotated[str | None, Header(**IDEMPOTENCY_KEY)] = None,
) -> Accepted:
    input_model = INPUTS.get(body.task)
    if input_model is None:
        raise HTTPException(422, f"unknown task {body.task!r}")
    try:
        input_model.model_validate(body.input)
    except ValidationError as exc:
        raise HTTPException(400, exc.errors(include_url=False)) from exc
    pool: ArqRedis = request.app.state.arq
    job = await pool.enqueue_job(body.task, body.input, _job_id=idempotency_key)
    if job is None:
        raise HTTPException(409, "a job with this idempotency key exists")
    return Accepted(run_id=job.job_id, task=body.task, status="queued")


async def sleep(ctx: dict[str, Any], params: dict[str, Any]) -> dict[str, float]:
    """The ``sleep`` task: one step, as Quiesce runs the bench's body."""
    seconds = float(params["seconds"])
    await asyncio.sleep(seconds)
    return {"slept": seconds}


class WorkerSettings:
    """The worker: ``python -m arq fastapi_arq.WorkerSettings``.

    arq's defaults but ``max_jobs``: 100 jobs at once instead of 10, as a queue meant
    for thousands of short jobs a second would be set up. A poll of the queue (every
    0.5 s) reads at most 5 x ``max_jobs`` jobs (at least 100): with 10, a backlog
    drains at 200 jobs a second at most.
    """

    functions = [func(sleep, name="sleep")]  # noqa: RUF012 (arq reads a class attribute)
    max_jobs = 100
    redis_settings = redis_settings() if "BENCH_REDIS_URL" in os.environ else RedisSettings()
