"""The bench's peers (``bench/peers/``) keep the durability they are compared with:
the record and the idempotency key are in Redis before the 202, and a key reused
answers as its contract says. Skipped without the ``bench`` extra."""

from __future__ import annotations

import importlib
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import ModuleType

import httpx
import pytest

from tests.conftest import REPO, RedisServer

pytest.importorskip("fastapi")
pytest.importorskip("arq")

BODY = {"task": "sleep", "input": {"seconds": 0}}


@pytest.fixture
def peer(
    request: pytest.FixtureRequest, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    monkeypatch.setenv("BENCH_REDIS_URL", redis_server.url)
    monkeypatch.syspath_prepend(str(REPO / "bench" / "peers"))
    module = importlib.import_module(request.param)
    yield module
    sys.modules.pop(request.param, None)


@asynccontextmanager
async def serving(peer: ModuleType) -> AsyncIterator[httpx.AsyncClient]:
    """The peer's app with its lifespan run, as uvicorn would run it."""
    async with (
        peer.app.router.lifespan_context(peer.app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=peer.app), base_url="http://peer"
        ) as http,
    ):
        yield http


async def post(http: httpx.AsyncClient, body: object, key: str | None = None) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return await http.post("/v1/runs", json=body, headers=headers)


@pytest.mark.parametrize("peer", ["fastapi_redis"], indirect=True)
async def test_fastapi_redis_writes_record_and_key_before_answering(
    peer: ModuleType, redis_server: RedisServer
) -> None:
    async with serving(peer) as http:
        created = await post(http, BODY, "k1")
        assert created.status_code == 202, created.text
        run_id = created.json()["run_id"]
        assert created.headers["location"] == f"/v1/runs/{run_id}"
        with redis_server.client() as db:
            assert db.get("idempotency:k1") is not None
            stored = db.hget(f"run:{run_id}", "record")
            assert stored is not None
            record = peer.RunRecord.model_validate_json(stored).model_dump(mode="json")
            assert record == created.json()
            assert db.xlen(f"run:{run_id}:events") == 1

        again = await post(http, BODY, "k1")
        assert again.status_code == 202
        assert again.json() == created.json()
        assert (
            await post(http, {"task": "sleep", "input": {"seconds": 1}}, "k1")
        ).status_code == 422
        assert (await post(http, {"task": "sleep", "input": {"seconds": -1}})).status_code == 400
        assert (await post(http, {"task": "nope"})).status_code == 422


@pytest.mark.parametrize("peer", ["fastapi_arq"], indirect=True)
async def test_fastapi_arq_enqueues_the_job_before_answering(
    peer: ModuleType, redis_server: RedisServer
) -> None:
    async with serving(peer) as http:
        created = await post(http, BODY, "k1")
        assert created.status_code == 202, created.text
        assert created.json()["run_id"] == "k1"
        with redis_server.client() as db:
            assert db.exists("arq:job:k1")
            assert db.zscore("arq:queue", "k1") is not None
            assert (await post(http, BODY, "k1")).status_code == 409
            assert db.zcard("arq:queue") == 1
