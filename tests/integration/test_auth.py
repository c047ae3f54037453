"""Auth of /v1 and /admin: a bearer token when one is set, loopback only when not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from service.config import Settings
from service.web.app import create_app
from tests.conftest import AUTH, TOKEN
from tests.integration.support import Client, ClientAddress, metric, sleep_body

RUN = "run_" + "a" * 26
#: Every guarded route, with a request that passes validation when authorized.
GUARDED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/runs", sleep_body(0)),
    ("GET", f"/v1/runs/{RUN}", None),
    ("GET", f"/v1/runs/{RUN}/events", None),
    ("GET", f"/v1/runs/{RUN}/events/stream", None),
    ("POST", f"/v1/runs/{RUN}/cancel", None),
    ("GET", "/v1/tasks", None),
    ("GET", "/admin/state", None),
    ("POST", "/admin/drain", None),
]
PROBES = ["/healthz", "/readyz", "/metrics"]


async def send(client: Client, method: str, path: str, body: Any, **headers: str) -> Any:
    return await client.request(method, path, json=body, headers=headers)


@pytest.fixture
async def plain_client(settings: Settings) -> AsyncIterator[Client]:
    """An app with a token, and a client that sends none by default."""
    async with AsyncTestClient(create_app(settings)) as client:
        yield client


BAD_AUTHORIZATIONS = [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Bearer wrong-token-0123456789ab",
    f"Bearer {TOKEN}x",
    f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN.upper()}",
    f"Basic {TOKEN}",
    f"Token {TOKEN}",
    TOKEN,
]


async def test_without_the_right_bearer_token_guarded_routes_are_401(
    plain_client: Client,
) -> None:
    for authorization in BAD_AUTHORIZATIONS:
        headers = {} if authorization is None else {"Authorization": authorization}
        for method, path, body in GUARDED:
            response = await send(plain_client, method, path, body, **headers)
            assert response.status_code == 401, (authorization, method, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["status_code"] == 401
    # Nothing was done: no run was created and no drain started.
    state = await plain_client.get("/admin/state", headers=AUTH)
    assert state.json()["state"] == "ready"
    assert state.json()["active_count"] == 0


async def test_with_the_bearer_token_guarded_routes_are_served(plain_client: Client) -> None:
    expected = {"/v1/runs": 202, "/v1/tasks": 200, "/admin/state": 200, "/admin/drain": 202}
    for method, path, body in GUARDED:
        response = await send(plain_client, method, path, body, **AUTH)
        # Unknown runs are 404: the request got past auth.
        assert response.status_code == expected.get(path, 404), (method, path, response.text)


async def test_the_scheme_is_case_insensitive(plain_client: Client) -> None:
    for scheme in ("bearer", "BEARER"):
        response = await plain_client.get(
            "/v1/tasks", headers={"Authorization": f"{scheme} {TOKEN}"}
        )
        assert response.status_code == 200, scheme


async def test_probes_and_metrics_need_no_token(plain_client: Client) -> None:
    for path in PROBES:
        response = await plain_client.get(path)
        assert response.status_code == 200, path
        wrong = await plain_client.get(path, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 200, path


# --- no token: loopback only ---------------------------------------------------------


@pytest.fixture
def open_settings(settings: Settings) -> Settings:
    return replace(settings, api_token=None)


@pytest.fixture
async def open_app(open_settings: Settings) -> AsyncIterator[tuple[ClientAddress, Client]]:
    """An app without a token, behind a wrapper that sets the client's address."""
    wrapper = ClientAddress(create_app(open_settings), "127.0.0.1")
    async with AsyncTestClient(wrapper) as client:
        yield wrapper, client


async def test_without_a_token_loopback_clients_are_served(
    open_app: tuple[ClientAddress, Client],
) -> None:
    wrapper, client = open_app
    for host in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        wrapper.host = host
        for method, path, body in GUARDED[:-1]:  # all but the drain
            response = await send(client, method, path, body)
            assert response.status_code != 401, (host, method, path)
        assert (await client.get("/v1/tasks")).status_code == 200, host
        assert (await client.get("/admin/state")).status_code == 200, host
    response = await client.post("/admin/drain")
    assert response.status_code == 202
    assert response.json()["drain"]["trigger"] == "admin"


async def test_without_a_token_other_clients_get_401_but_probes_answer(
    open_app: tuple[ClientAddress, Client],
) -> None:
    wrapper, client = open_app
    for host in ("10.0.0.7", "192.168.1.20", "2001:db8::1", "::ffff:10.0.0.7", "testclient"):
        wrapper.host = host
        for method, path, body in GUARDED:
            response = await send(client, method, path, body)
            assert response.status_code == 401, (host, method, path)
            assert response.headers["www-authenticate"] == "Bearer"
        # A bearer header does not help when no token is configured.
        response = await client.get("/v1/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 401, host
        for path in PROBES:
            assert (await client.get(path)).status_code == 200, (host, path)
        assert (await client.get("/readyz")).json() == {"status": "ready"}
    text = (await client.get("/metrics")).text
    assert (
        metric(text, "quiesce_runs_rejected_total", reason="unauthorized") == 5
    )  # one create per host


async def test_without_a_token_a_warning_is_logged_at_start(
    open_settings: Settings, settings: Settings
) -> None:
    for app_settings, warned in ((open_settings, True), (settings, False)):
        app = create_app(app_settings)  # configures logging; capture after that
        with capture_logs() as logs:
            async with AsyncTestClient(app):
                pass
        warnings = [e for e in logs if e["event"] == "auth_loopback_only"]
        assert bool(warnings) is warned
        if warned:
            assert warnings[0]["log_level"] == "warning"
