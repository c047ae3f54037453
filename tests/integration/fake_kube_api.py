"""A small fake of the Kubernetes API server: HTTPS with a CA made at test time.

It serves ``GET`` and ``PATCH`` on one pod, records every request (method, path,
headers, body) and answers the way the API server does: the pod object, or a
``Status`` with a reason on an error. A test sets the status the next requests get,
and the service-account directory (token, CA, namespace) the service reads.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trustme

NAMESPACE = "jobs"
POD = "quiesce-7d9f8b6c5d-x2k4p"
POD_PATH = f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}"
ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
REASONS = {403: "Forbidden", 404: "NotFound", 500: "InternalError", 429: "TooManyRequests"}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeKubeAPI:
    ca: trustme.CA
    sa_dir: Path
    requests: list[Request] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    #: The status code every next request gets (200: served normally).
    status: int = 200
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def patches(self) -> list[Request]:
        return [r for r in self.requests if r.method == "PATCH"]

    def patched_values(self) -> list[str]:
        return [r.json()["metadata"]["annotations"][ANNOTATION] for r in self.patches]

    def write_token(self, token: str) -> None:
        (self.sa_dir / "token").write_text(token + "\n", encoding="utf-8")

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(context)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def wait_for(self, predicate: Any, within: float = 10.0) -> None:
        """Wait until ``predicate(self)`` holds (checked at every request)."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: predicate(self)), within)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        connection = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    connection.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    writer.write(self._answer(connection, request, body))
                    await writer.drain()
                    connection.start_next_cycle()
                    async with self._arrived:
                        self._arrived.notify_all()
                else:
                    return
        except (ConnectionError, ssl.SSLError, h11.ProtocolError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    def _answer(self, connection: h11.Connection, request: h11.Request, body: bytes) -> bytes:
        recorded = Request(
            method=request.method.decode(),
            path=request.target.decode(),
            headers={k.decode().lower(): v.decode() for k, v in request.headers},
            body=body,
        )
        self.requests.append(recorded)
        status, payload = self._respond(recorded)
        content = json.dumps(payload).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(content)))]
        out = connection.send(h11.Response(status_code=status, headers=headers)) or b""
        out += connection.send(h11.Data(data=content)) or b""
        out += connection.send(h11.EndOfMessage()) or b""
        return out

    def _respond(self, request: Request) -> tuple[int, dict[str, Any]]:
        if self.status != 200:
            reason = REASONS.get(self.status, "InternalError")
            message = f'pods "{POD}" is {reason.lower()}'
            return self.status, {"kind": "Status", "reason": reason, "message": message}
        if request.path != POD_PATH or request.method not in ("GET", "PATCH"):
            return 404, {"kind": "Status", "reason": "NotFound", "message": "not found"}
        if request.method == "PATCH":
            patch = request.json()
            self.annotations.update(patch["metadata"]["annotations"])
        pod = {"kind": "Pod", "metadata": {"name": POD, "namespace": NAMESPACE}}
        if self.annotations:
            pod["metadata"]["annotations"] = dict(self.annotations)  # type: ignore[index]
        return 200, pod


def make_sa_dir(path: Path, ca: trustme.CA, token: str) -> Path:
    """A service-account directory as Kubernetes mounts it: token, ca.crt, namespace."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "token").write_text(token + "\n", encoding="utf-8")
    ca.cert_pem.write_to_path(str(path / "ca.crt"))
    (path / "namespace").write_text(NAMESPACE, encoding="utf-8")
    return path
