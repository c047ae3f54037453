"""``/schema/openapi.json`` tells the whole truth: each fact a client relies on is
checked here, from the served document (what clients and generators read)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.web.app import create_app
from tests.integration.support import Client

RUNS = "/v1/runs"
RUN = "/v1/runs/{run_id}"
EVENTS = "/v1/runs/{run_id}/events"
STREAM = "/v1/runs/{run_id}/events/stream"
CANCEL = "/v1/runs/{run_id}/cancel"

#: Every status code each operation can return.
STATUS_CODES = {
    ("post", RUNS): {"202", "400", "401", "408", "409", "413", "415", "422", "429", "503"},
    ("get", RUN): {"200", "400", "401", "404", "503"},
    ("get", EVENTS): {"200", "400", "401", "404", "503"},
    ("get", STREAM): {"200", "400", "401", "404", "503"},
    ("post", CANCEL): {"200", "202", "400", "401", "404", "409", "503"},
    ("get", "/v1/tasks"): {"200", "401"},
    ("post", "/admin/drain"): {"202", "400", "401"},
    ("get", "/admin/state"): {"200", "401"},
    ("get", "/admin/runs"): {"200", "401"},
    ("get", "/healthz"): {"200"},
    ("get", "/readyz"): {"200", "503"},
    ("get", "/metrics"): {"200"},
}


@pytest.fixture
async def document(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    async with AsyncTestClient(create_app(settings)) as client:
        response = await client.get("/schema/openapi.json")
        assert response.status_code == 200
        yield response.json()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(create_app(settings)) as test_client:
        yield test_client


def operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    found: dict[str, Any] = document["paths"][path][method]
    return found


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    resolved: dict[str, Any] = document
    for part in ref.removeprefix("#/").split("/"):
        resolved = resolved[part]
    return resolved


def test_every_operation_is_listed(document: dict[str, Any]) -> None:
    listed = {(m, p) for p, item in document["paths"].items() for m in item}
    assert listed == set(STATUS_CODES)


@pytest.mark.parametrize(("method", "path"), sorted(STATUS_CODES))
def test_every_status_code_is_documented(document: dict[str, Any], method: str, path: str) -> None:
    assert set(operation(document, method, path)["responses"]) == STATUS_CODES[method, path]


@pytest.mark.parametrize(("method", "path"), sorted(STATUS_CODES))
def test_every_error_has_the_error_body(document: dict[str, Any], method: str, path: str) -> None:
    for status, response in operation(document, method, path)["responses"].items():
        if int(status) < 400 or path == "/readyz":
            continue
        schema = resolve(document, response["content"]["application/json"]["schema"])
        assert set(schema["required"]) == {"status_code", "detail"}, (status, schema)
        assert set(schema["properties"]) == {"status_code", "detail", "extra"}


def test_retry_after_and_the_bearer_challenge_are_documented(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                headers = response.get("headers") or {}
                if status in {"429", "503"} and path != "/readyz":
                    assert "Retry-After" in headers, (method, path, status)
                if status == "401":
                    assert "WWW-Authenticate" in headers, (method, path)
    created = operation(document, "post", RUNS)["responses"]["202"]["headers"]
    assert created["Location"]["required"] is True


def test_the_api_and_admin_need_a_bearer_token_and_the_probes_do_not(
    document: dict[str, Any],
) -> None:
    schemes = document["components"]["securitySchemes"]
    [(name, scheme)] = schemes.items()
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    for method, path in STATUS_CODES:
        security = operation(document, method, path).get("security")
        if path.startswith(("/v1/", "/admin/")):
            assert security == [{name: []}], (method, path)
        else:
            assert not security, (method, path)


def test_the_stream_is_documented_as_server_sent_events(document: dict[str, Any]) -> None:
    content = operation(document, "get", STREAM)["responses"]["200"]["content"]
    assert list(content) == ["text/event-stream"]
    frame = content["text/event-stream"]["schema"]
    assert frame["properties"]["data"]["contentMediaType"] == "application/json"
    assert set(frame["properties"]["event"]["enum"]) == {
        "run_started", "run_progress", "run_requeued", "run_succeeded", "run_failed",
        "run_cancelled",
    }  # fmt: skip
    assert "retry" in frame["properties"]


async def test_metrics_are_documented_as_the_text_format_they_are(
    document: dict[str, Any], client: Client
) -> None:
    [media_type] = operation(document, "get", "/metrics")["responses"]["200"]["content"]
    assert media_type.startswith("text/plain; version=")
    served = (await client.get("/metrics")).headers["content-type"]
    assert served.startswith(media_type)


def create_branches(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    body = operation(document, "post", RUNS)["requestBody"]
    assert body["required"] is True
    schema = body["content"]["application/json"]["schema"]
    return {branch["properties"]["task"]["const"]: branch for branch in schema["oneOf"]}


def test_the_create_body_is_one_registered_task_with_its_input(document: dict[str, Any]) -> None:
    branches = create_branches(document)
    assert set(branches) == {"sleep", "http"}
    sleep = branches["sleep"]
    assert sleep["required"] == ["task", "input"]
    sleep_input = resolve(document, sleep["properties"]["input"])
    assert sleep_input["required"] == ["seconds"]
    assert sleep_input["properties"]["seconds"]["maximum"] == 86400
    assert sleep_input["additionalProperties"] is False


def test_the_create_body_states_its_constraints(document: dict[str, Any]) -> None:
    for branch in create_branches(document).values():
        assert branch["additionalProperties"] is False
        [timeout, _null] = branch["properties"]["timeout_seconds"]["anyOf"]
        assert timeout["exclusiveMinimum"] == 0
        assert timeout["maximum"] == 7 * 24 * 3600
        metadata = branch["properties"]["metadata"]
        assert metadata["maxProperties"] == 64
        assert metadata["propertyNames"] == {"minLength": 1, "maxLength": 63}
        assert metadata["additionalProperties"]["maxLength"] == 1024


def test_the_idempotency_key_states_its_constraints(document: dict[str, Any]) -> None:
    [key] = [
        p for p in operation(document, "post", RUNS)["parameters"] if p["name"] == "Idempotency-Key"
    ]
    assert key["in"] == "header"
    assert key["schema"]["minLength"] == 1
    assert key["schema"]["maxLength"] == 255
    assert key["schema"]["pattern"] == "^[!-~]+$"


def test_the_page_size_states_its_range(document: dict[str, Any]) -> None:
    [limit] = [p for p in operation(document, "get", EVENTS)["parameters"] if p["name"] == "limit"]
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 1000)


def test_a_created_run_links_to_the_operations_on_it(document: dict[str, Any]) -> None:
    links = operation(document, "post", RUNS)["responses"]["202"]["links"]
    ids = {op["operationId"] for item in document["paths"].values() for op in item.values()}
    targets = {link["operationId"] for link in links.values()}
    assert targets == {"getRun", "listEvents", "streamEvents", "cancelRun"}
    assert targets <= ids
    for link in links.values():
        assert link["parameters"] == {"run_id": "$response.body#/run_id"}
