"""The shared HTTP client: its connection pool is built on the first request."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service import http_client


async def serve_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
    await writer.drain()
    writer.close()


async def test_the_pool_is_built_on_the_first_request(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    server = await asyncio.start_server(serve_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, http_client.new_client() as client:
        transport = client._transport
        assert isinstance(transport, http_client._OnFirstUse)
        assert transport._transport is None  # nothing built at start
        response = await client.get(f"http://127.0.0.1:{port}/")
        assert (response.status_code, response.text) == (200, "ok")
        assert isinstance(transport._transport, httpx.AsyncHTTPTransport)
        assert client.timeout == http_client.TIMEOUT
        assert client.follow_redirects is False


async def test_with_proxies_in_the_environment_httpx_builds_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    async with http_client.new_client() as client:
        assert isinstance(client._transport, httpx.AsyncHTTPTransport)
        assert client._mounts  # httpx's own proxy transports
