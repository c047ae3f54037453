"""The bare broadcast yardstick for ``perf_fanout.py``.

A minimal Litestar app (loaded by Granian with ``--factory``, under the same command
line as ``quiesce serve``) that serves ``GET /v1/runs/{id}/events/stream`` from
memory: each channel's frames are encoded once, as bytes in the service's own SSE
shape (``id:``, ``event:``, ``data:`` with the event JSON), and handed to every open
stream of that channel through its queue. ``POST /broadcast`` starts the emitters in
the server process, on the schedule of the ``tick`` task (``perf_tasks.py``). No
store, no auth, no metrics, no cursors: what is left is the cost of Granian,
Litestar and one queue per stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec
from litestar import Litestar, Request, get, post
from litestar.response import Stream

_ENCODER = msgspec.json.Encoder()


class Start(msgspec.Struct, kw_only=True, frozen=True):
    channels: list[str]
    rate: float
    ticks: int
    start_at: float


class Broadcast:
    def __init__(self) -> None:
        self.streams: dict[str, set[asyncio.Queue[bytes]]] = {}
        self.emitters: set[asyncio.Task[None]] = set()

    def publish(self, channel: str, frame: bytes) -> None:
        for queue in self.streams.get(channel, ()):
            queue.put_nowait(frame)

    async def emit(self, channel: str, rate: float, ticks: int, start_at: float) -> None:
        start = max(start_at, time.time())
        for i in range(ticks):
            delay = start + i / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t = time.time()
            cursor = f"{int(t * 1000)}-{i}"
            event = {
                "id": cursor,
                "type": "run_progress",
                "data": {"i": i, "t": t},
                "created_at": datetime.now(UTC).isoformat(),
            }
            self.publish(
                channel,
                b"id: " + cursor.encode() + b"\nevent: run_progress\ndata: "
                + _ENCODER.encode(event) + b"\n\n",
            )  # fmt: skip
        end = {"id": "end", "type": "run_succeeded", "data": {"output": None}}
        self.publish(
            channel, b"id: end\nevent: run_succeeded\ndata: " + _ENCODER.encode(end) + b"\n\n"
        )


BROADCAST = Broadcast()


@get("/v1/runs/{run_id:str}/events/stream", media_type="text/event-stream")
async def stream(run_id: str) -> Stream:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    streams = BROADCAST.streams.setdefault(run_id, set())
    streams.add(queue)

    async def frames() -> AsyncIterator[bytes]:
        try:
            yield b": stream opened\n\n"
            while True:
                frame = await queue.get()
                yield frame
                if frame.startswith(b"id: end\n"):
                    return
        finally:
            streams.discard(queue)

    return Stream(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@post("/broadcast", status_code=202)
async def start(request: Request[None, None, None]) -> dict[str, int]:
    spec = msgspec.json.decode(await request.body(), type=Start)
    for channel in spec.channels:
        task = asyncio.create_task(BROADCAST.emit(channel, spec.rate, spec.ticks, spec.start_at))
        BROADCAST.emitters.add(task)
        task.add_done_callback(BROADCAST.emitters.discard)
    return {"channels": len(spec.channels)}


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def create_app() -> Litestar:
    return Litestar(
        route_handlers=[stream, start, healthz], logging_config=None, openapi_config=None
    )
