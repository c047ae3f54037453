"""Schemathesis against the live app: every input gets a documented 2xx or 4xx.

The app runs in-process (ASGI, its lifespan included) with the memory store, and a
second, shorter pass with the Redis store. Cases are generated from the app's own
``/schema/openapi.json``: valid (positive) and invalid (negative) data for every
operation, then stateful sequences that follow the document's links from a created
run to reading, paging, streaming and cancelling it. Each response must not be a
server error, must have a documented status code and content type, and must match
the documented schema. Generation is deterministic with a fixed example budget, so
the run is repeatable and bounded.

``POST /admin/drain`` is a one-way switch (a drained replica refuses creates), so it is
fuzzed on an app of its own, after the others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import FlakyStrategyDefinition
from litestar import Litestar
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from service.config import Settings
from service.schemas import MAX_TIMEOUT_SECONDS
from service.web.app import create_app
from tests.conftest import AUTH, RedisServer

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
#: Examples per operation and mode (positive, negative) of the stateless pass.
EXAMPLES_PER_OPERATION = 100
#: Passes of the stateful test that Hypothesis may call flaky before it fails.
FLAKY_ATTEMPTS = 3
STATEFUL = settings(
    max_examples=60,
    stateful_step_count=8,
    derandomize=True,
    deadline=None,
    database=None,
    # No shrinking: a replayed sequence meets runs in another state (they finish in
    # their own time), which Hypothesis reports as a flaky strategy, hiding the
    # failure it found. The failing sequence is printed as it was.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
STATELESS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def fuzz_settings(base: Settings) -> Settings:
    """Runs that fuzzed bodies start must end soon and must never leave the machine."""
    return replace(
        base,
        # Only a host that cannot resolve: an `http` run with a generated URL is refused.
        http_allowed_hosts=("schemathesis.invalid",),
        run_timeout_seconds=1.0,
    )


def load(app: Litestar) -> Any:
    schema = schemathesis.openapi.from_asgi("/schema/openapi.json", app)
    schema.config.generation.update(
        modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
        max_examples=EXAMPLES_PER_OPERATION,
        deterministic=True,
        # Unknown query parameters are ignored (as HTTP APIs commonly do), not refused:
        # adding one does not make a request invalid.
        allow_extra_parameters=False,
    )
    return schema


@pytest.fixture(scope="module")
def settings_for_fuzz() -> Settings:
    return fuzz_settings(
        Settings(
            worker_id="fuzz",
            api_token=AUTH["Authorization"].removeprefix("Bearer "),
            shutdown_grace_seconds=0.5,
            log_format="json",
        )
    )


@pytest.fixture(scope="module")
def memory_api(settings_for_fuzz: Settings) -> Iterator[Any]:
    yield load(create_app(settings_for_fuzz)).exclude(operation_id="drain")
    stop_apps()


@pytest.fixture
def redis_api(redis_server: RedisServer, settings_for_fuzz: Settings) -> Iterator[Any]:
    app = create_app(replace(settings_for_fuzz, redis_url=redis_server.url))
    yield load(app).exclude(operation_id="drain")
    stop_apps()


@pytest.fixture
def drain_api(settings_for_fuzz: Settings) -> Iterator[Any]:
    yield load(create_app(settings_for_fuzz)).include(operation_id="drain")
    stop_apps()


def stop_apps() -> None:
    """Schemathesis keeps each app's lifespan running until the process exits; stop
    them (a drain, as on shutdown) so no app outlives its test and touches the
    session's Redis while other tests use it."""
    asgi.shutdown_lifespans()


#: Every operation of the document except the drain (fuzzed on its own app below).
OPERATIONS = (
    "createRun",
    "getRun",
    "listEvents",
    "streamEvents",
    "cancelRun",
    "listTasks",
    "replicaState",
    "recentRuns",
    "healthz",
    "readyz",
    "metrics",
)
POSITIVE = schemathesis.GenerationMode.POSITIVE
NEGATIVE = schemathesis.GenerationMode.NEGATIVE
MODES = (POSITIVE, NEGATIVE)
#: The probes and metrics take no input, so there is nothing to make invalid.
WITHOUT_INPUT = frozenset({"healthz", "readyz", "metrics"})


def keep_short(case: schemathesis.Case) -> None:
    """Generated runs end within the test: a valid ``sleep`` sleeps at most 50 ms and a
    valid deadline is at most 2 s (so a stream of a running run soon reaches its
    terminal event). Invalid values are left as generated, to be refused."""
    body = case.body
    if operation_id_of(case) != "createRun" or not isinstance(body, dict):
        return
    _shorten(body, "timeout_seconds", 2, MAX_TIMEOUT_SECONDS)
    task_input = body.get("input")
    if body.get("task") == "sleep" and isinstance(task_input, dict):
        _shorten(task_input, "seconds", 0.05, 86400)


def _shorten(fields: dict[str, Any], name: str, short: float, maximum: float) -> None:
    value = fields.get(name)
    if _is_number(value) and short < value <= maximum:
        fields[name] = short


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def operation_id_of(case: schemathesis.Case) -> str:
    operation_id: str = case.operation.definition.raw["operationId"]
    return operation_id


def fuzz(api: Any, operation_id: str, mode: Any, budget: settings) -> None:
    """Call one operation with every case Hypothesis generates in ``mode``."""
    operation = api.find_operation_by_id(operation_id)

    checks = [*CHECKS, negative_data_rejection] if mode is NEGATIVE else CHECKS

    @given(case=operation.as_strategy(mode))
    @budget
    def check(case: schemathesis.Case) -> None:
        keep_short(case)
        case.call_and_validate(headers=AUTH, checks=checks)

    check()


def test_every_operation_is_fuzzed(memory_api: Any) -> None:
    documented = {
        result.ok().definition.raw["operationId"] for result in memory_api.get_all_operations()
    }
    assert documented == set(OPERATIONS)


@pytest.mark.parametrize(
    ("operation_id", "mode"),
    [
        pytest.param(operation_id, mode, id=f"{operation_id}-{mode.value}")
        for operation_id in OPERATIONS
        for mode in MODES
        if not (mode is NEGATIVE and operation_id in WITHOUT_INPUT)
    ],
)
def test_every_operation_answers_as_documented(
    memory_api: Any, operation_id: str, mode: Any
) -> None:
    fuzz(memory_api, operation_id, mode, STATELESS)


@pytest.fixture
def fresh_api(settings_for_fuzz: Settings) -> Iterator[Any]:
    """An app of its own: the stateful pass starts from no runs, whatever ran before."""
    yield load(create_app(settings_for_fuzz)).exclude(operation_id="drain")
    stop_apps()


def test_stateful_workflows_reach_real_runs(fresh_api: Any) -> None:
    """Sequences that follow the links from a created run reach that run: the test
    fails if no linked call ever found its run (the links would be dead)."""
    workflow = fresh_api.as_state_machine()
    answered: Counter[tuple[str, int]] = Counter()

    class Authenticated(workflow):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": AUTH}

        def before_call(self, case: schemathesis.Case) -> None:
            keep_short(case)

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            answered[operation_id_of(case), response.status_code] += 1

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, headers=AUTH)

    # Runs end in their own time, so the same sequence can meet a run in another
    # state when Hypothesis walks it again; it then reports its own bookkeeping as a
    # "flaky strategy", not a failure of the service. Such a pass is run again (a
    # real failure fails every attempt, with its own error).
    for attempt in range(1, FLAKY_ATTEMPTS + 1):
        try:
            Authenticated.run(settings=STATEFUL)
            break
        except FlakyStrategyDefinition:
            if attempt == FLAKY_ATTEMPTS:
                raise
    assert answered["createRun", 202] > 0, answered
    assert answered["getRun", 200] > 0, answered
    assert answered["listEvents", 200] > 0, answered
    assert answered["streamEvents", 200] > 0, answered
    assert answered["cancelRun", 202] + answered["cancelRun", 409] > 0, answered


@pytest.mark.parametrize("operation_id", ["createRun", "listEvents", "streamEvents", "cancelRun"])
def test_redis_store_answers_as_documented(redis_api: Any, operation_id: str) -> None:
    """A shorter pass with the Redis store: its cursors and errors differ from memory's."""
    for mode in MODES:
        fuzz(redis_api, operation_id, mode, settings(STATELESS, max_examples=30))


def test_drain_answers_as_documented(drain_api: Any) -> None:
    for mode in MODES:
        fuzz(drain_api, "drain", mode, settings(STATELESS, max_examples=15))
