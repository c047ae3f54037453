"""Every dashboard query, and every rule, run by a real Prometheus scraping a real Quiesce.

A Quiesce (``quiesce serve``, Granian) on its own Redis does some of everything a
dashboard shows: runs succeed, fail on their deadline, are cancelled, one is refused
at capacity and one as invalid, a callback is delivered, an event stream is read, and
its Redis is restarted empty (store errors, then a store reset). Prometheus (Debian's
binary, on a free port) scrapes it every second with the labels a Kubernetes scrape
adds (``job``, ``namespace``, ``pod``) and loads the rules file. Each panel's query, with
Grafana's variables filled in, must parse and return data.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

import httpx
import pytest
import yaml

from tests.conftest import RedisServer, free_port, require_tool
from tests.e2e.conftest import Server, start_server, stop
from tests.observability.conftest import RULES, dashboard, panels, recording_rules

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

NAMESPACE: Final = "quiesce-test"
POD: Final = "quiesce-test-0"
#: Grafana's variables as they would be filled in: the pod variable is a regex.
VARIABLES: Final = {
    "$__rate_interval": "15s",
    "$__range": "10m",
    "$namespace": NAMESPACE,
    "$pod": POD,
}
WAIT_SECONDS: Final = 60.0


def fill(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"an unknown variable in {expr}"
    return expr


def wait_for(what: str, check: Any, within: float = WAIT_SECONDS) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.2)


class _Receiver(BaseHTTPRequestHandler):
    """A callback receiver that accepts everything."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # the base's name
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own: it is restarted empty, which no other test expects."""
    server = RedisServer(binary=require_tool("redis-server"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def quiesce(
    prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory, own_redis: RedisServer
) -> Iterator[Server]:
    """Asks for the prometheus binary first: without it nothing is started."""
    server = start_server(
        tmp_path_factory.mktemp("quiesce"),
        own_redis.url,
        QUIESCE_MAX_ACTIVE_RUNS="2",
        QUIESCE_LEASE_TTL_SECONDS="3",  # renewals (and the reset check) every second
        QUIESCE_HTTP_ALLOWED_HOSTS="127.0.0.1",
    )
    yield server
    stop(server)


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return require_tool("prometheus")


@pytest.fixture(scope="module")
def prometheus(
    prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory, quiesce: Server
) -> Iterator[str]:
    binary = prometheus_binary
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "quiesce",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{quiesce.port}"],
                        "labels": {"namespace": NAMESPACE, "pod": POD},
                    }
                ],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited:\n{log_path.read_text(errors='replace')}")
            try:
                return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("prometheus to be ready", ready)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def metric_value(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_until_done(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/runs", json=body)
    assert response.status_code == 202, response.text
    run_id = response.json()["run_id"]

    def finished() -> dict[str, Any] | None:
        record: dict[str, Any] = client.get(f"/v1/runs/{run_id}").json()
        return record if record["status"] != "running" else None

    result: dict[str, Any] = wait_for(f"run {run_id} to finish", finished)
    return result


@pytest.fixture(scope="module")
def worked(prometheus: str, quiesce: Server, own_redis: RedisServer, receiver: str) -> str:
    """Prometheus, once Quiesce has done some of everything and been scraped since."""
    with httpx.Client(base_url=quiesce.url, timeout=10) as client:
        done = run_until_done(
            client, {"task": "sleep", "input": {"seconds": 0.05}, "callback_url": receiver}
        )
        assert done["status"] == "succeeded"
        timed_out = run_until_done(
            client, {"task": "sleep", "input": {"seconds": 60}, "timeout_seconds": 0.3}
        )
        assert timed_out["error"]["reason"] == "timeout"
        long_runs = [
            client.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 600}})
            for _ in range(2)
        ]
        assert [r.status_code for r in long_runs] == [202, 202]
        refused = client.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 1}})
        assert refused.status_code == 429
        assert client.post("/v1/runs", json={"task": "sleep", "input": {}}).status_code == 400
        for response in long_runs:
            cancel = client.post(f"/v1/runs/{response.json()['run_id']}/cancel")
            assert cancel.status_code == 202
        stream = client.get(f"/v1/runs/{done['run_id']}/events/stream")
        assert stream.status_code == 200
        assert "run_succeeded" in stream.text
        wait_for("the callback", lambda: metric_value(quiesce, "quiesce_callbacks_total") >= 1)

        # Redis gone: reads answer 503 and count store errors; back empty: a reset.
        own_redis.stop()
        assert client.get(f"/v1/runs/{done['run_id']}").status_code == 503
        own_redis.start()
        wait_for(
            "the store reset", lambda: metric_value(quiesce, "quiesce_store_resets_total") >= 1
        )
        wait_for("readiness", lambda: client.get("/readyz").status_code == 200, within=WAIT_SECONDS)
    assert metric_value(quiesce, "quiesce_store_errors_total") >= 1

    def target_up() -> bool:
        answer = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()
        return any(t["health"] == "up" for t in answer["data"]["activeTargets"])

    wait_for("the scrape target to be up", target_up)
    return prometheus


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    answer = response.json()
    assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


TARGETS: Final = [
    pytest.param(target["expr"], id=f"{panel['title']}/{target['refId']}")
    for panel in panels()
    for target in panel["targets"]
]


@pytest.mark.parametrize("expr", TARGETS)
def test_panel_query_returns_data(worked: str, expr: str) -> None:
    filled = fill(expr)
    query(worked, filled)  # parses: an error fails at once, not after the wait
    result = wait_for(f"data from {filled}", lambda: query(worked, filled))
    # The series are this pod's, labelled as a Kubernetes scrape labels them.
    for sample in result:
        assert sample["metric"].get("pod", POD) == POD
        assert sample["metric"].get("namespace", NAMESPACE) == NAMESPACE


@pytest.mark.parametrize("variable", dashboard()["templating"]["list"][1:], ids=lambda v: v["name"])
def test_template_variables_find_the_pod(worked: str, variable: dict[str, Any]) -> None:
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
    assert match is not None
    selector, label = fill(match[1]), match[2]
    answer = httpx.get(
        f"{worked}/api/v1/label/{label}/values", params={"match[]": selector}, timeout=10
    ).json()
    assert answer["status"] == "success"
    assert answer["data"] == [{"namespace": NAMESPACE, "pod": POD}[label]]


def test_prometheus_loads_every_rule_and_records_data(worked: str) -> None:
    groups = httpx.get(f"{worked}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    for rule in rules:
        assert rule["health"] == "ok", rule
    for rule in recording_rules():
        wait_for(f"{rule['record']} to be recorded", lambda r=rule: query(worked, r["record"]))
