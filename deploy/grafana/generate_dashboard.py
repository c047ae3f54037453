"""Write the Quiesce Grafana dashboard (``quiesce-dashboard.json``) from this list of panels.

The panels are data here, so the JSON (about 1,500 lines of layout and boilerplate)
is never edited by hand, the queries are easy to review in one place, and
``tests/observability/`` checks the committed file is exactly this output and runs
every query against a real Prometheus scraping a real Quiesce.

    python deploy/grafana/generate_dashboard.py          # rewrite the JSON
    python deploy/grafana/generate_dashboard.py --check  # exit 1 if it is stale

The JSON needs Grafana 10 or newer. It has no ``__inputs``: the Prometheus data source
is the ``datasource`` variable, so the same file imports through the UI and loads
through a provisioning sidecar (README, "Dashboards and alerts").
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
OUTPUT: Final = HERE / "quiesce-dashboard.json"

DATASOURCE: Final = {"type": "prometheus", "uid": "${datasource}"}
#: The pods the dashboard shows: every series carries `namespace` and `pod`, as the
#: ServiceMonitor's scrape labels them.
SEL: Final = 'namespace="$namespace", pod=~"$pod"'
#: The HPA and KEDA see every pod of the namespace, whatever `pod` is set to.
NS: Final = 'namespace="$namespace"'
RATE: Final = "$__rate_interval"
#: The HPA's target (deploy/k8s/hpa.yaml) and the failure-ratio alert's threshold
#: (deploy/prometheus/quiesce-rules.yaml), drawn as lines.
HPA_TARGET: Final = 70
#: The adapter's external metric quiesce_runs_demand (deploy/k8s/prometheus-adapter):
#: active runs of every pod plus the queue, which one replica at a time exports.
DEMAND: Final = (
    f"sum(max by (pod) (quiesce_active_runs{{{NS}}}))"
    f" + (max(quiesce_queued_runs{{{NS}}}) or vector(0))"
)
FAILURE_RATIO_ALERT: Final = 0.25
STREAM_ROUTE: Final = "/v1/runs/{run_id}/events/stream"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    #: A value drawn as a red line (timeseries) or turning the value red (stat).
    threshold: float | None = None
    stacked: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def rate(metric: str, by: str, extra: str = "") -> str:
    selector = f"{SEL}, {extra}" if extra else SEL
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"


def quantile(q: float, metric: str, by: str, extra: str = "") -> str:
    selector = f"{SEL}, {extra}" if extra else SEL
    grouping = f"le, {by}" if by else "le"
    buckets = f"rate({metric}_bucket{{{selector}}}[{RATE}])"
    return f"histogram_quantile({q}, sum by ({grouping}) ({buckets}))"


ROWS: Final = (
    Row(
        "Capacity and scaling",
        (
            Panel(
                "Pods",
                "Pods reporting metrics.",
                (Query(f"count(max by (pod) (quiesce_active_runs{{{SEL}}}))", "pods"),),
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Active runs",
                "Runs executing now, all pods.",
                (Query(f"sum(quiesce_active_runs{{{SEL}}})", "active runs"),),
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Capacity used",
                "Active runs over the pods' admission limits (QUIESCE_MAX_ACTIVE_RUNS); "
                "a pod at its limit answers creates with 429.",
                (
                    Query(
                        f"sum(quiesce_active_runs{{{SEL}}})"
                        f" / sum(quiesce_max_active_runs{{{SEL}}})",
                        "capacity used",
                    ),
                ),
                unit="percentunit",
                kind="stat",
                width=6,
                height=4,
                threshold=0.9,
            ),
            Panel(
                "Draining pods",
                "Pods draining now. A drain ends within QUIESCE_SHUTDOWN_GRACE_SECONDS + 2 s.",
                (Query(f"sum(quiesce_draining{{{SEL}}})", "draining"),),
                kind="stat",
                width=6,
                height=4,
                threshold=1,
            ),
            Panel(
                "Active runs vs capacity per pod",
                "quiesce_active_runs per pod, and its admission limit (above it: 429).",
                (
                    Query(f"max by (pod) (quiesce_active_runs{{{SEL}}})", "{{pod}} active"),
                    Query(f"max by (pod) (quiesce_max_active_runs{{{SEL}}})", "{{pod}} limit"),
                ),
            ),
            Panel(
                "HPA signal",
                "What the HPA sees: prometheus-adapter serves quiesce_runs_demand, the "
                "namespace's active runs (max by pod) plus the queued runs waiting for an "
                f"attempt, and the HPA keeps it at {HPA_TARGET} per replica (the red line). "
                "KEDA's query is the same total, which it divides by the replica count.",
                (
                    Query(
                        f"({DEMAND}) / count(max by (pod) (quiesce_active_runs{{{NS}}}))",
                        "demand per pod (HPA)",
                    ),
                    Query(f"max by (pod) (quiesce_active_runs{{{NS}}})", "{{pod}} active"),
                    Query(DEMAND, "demand: active + queued (KEDA query)"),
                ),
                threshold=HPA_TARGET,
            ),
            Panel(
                "Draining per pod",
                "quiesce_draining: 1 while a pod drains (after a preStop hook, SIGTERM or "
                "POST /admin/drain).",
                (Query(f"max by (pod) (quiesce_draining{{{SEL}}})", "{{pod}}"),),
                width=24,
                height=6,
            ),
        ),
    ),
    Row(
        "Runs",
        (
            Panel(
                "Runs started by task",
                "Runs admitted per second.",
                (Query(rate("quiesce_runs_started_total", "task"), "{{task}}"),),
                unit="reqps",
            ),
            Panel(
                "Runs finished by status",
                "Runs reaching a terminal status per second.",
                (Query(rate("quiesce_runs_finished_total", "status"), "{{status}}"),),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Failure ratio",
                "Failed runs over finished runs; the QuiesceHighFailureRatio alert's "
                f"threshold ({FAILURE_RATIO_ALERT:.0%} over 10 minutes) is the red line.",
                (
                    Query(
                        rate("quiesce_runs_finished_total", "namespace", 'status="failed"')
                        + " / "
                        + rate("quiesce_runs_finished_total", "namespace"),
                        "failed / finished",
                    ),
                ),
                unit="percentunit",
                threshold=FAILURE_RATIO_ALERT,
            ),
            Panel(
                "Failures by reason",
                "error: the task raised; timeout; shutdown: cancelled by a drain; "
                "worker_lost: its worker died without draining (counted by the reaper).",
                (Query(rate("quiesce_run_failures_total", "reason"), "{{reason}}"),),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Cancellations by reason",
                "Tasks cancelled: user (POST cancel), shutdown (a drain), timeout.",
                (Query(rate("quiesce_run_cancellations_total", "reason"), "{{reason}}"),),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Run duration quantiles",
                "From admission to the terminal write, all tasks and statuses.",
                tuple(
                    Query(quantile(q, "quiesce_run_duration_seconds", ""), f"p{round(q * 100)}")
                    for q in (0.5, 0.9, 0.99)
                ),
                unit="s",
            ),
            Panel(
                "Run duration p95 by task",
                "The p95 of each task; set QUIESCE_SHUTDOWN_GRACE_SECONDS above it.",
                (Query(quantile(0.95, "quiesce_run_duration_seconds", "task"), "{{task}}"),),
                unit="s",
            ),
            Panel(
                "Orphans reaped",
                "Runs of lost workers finalized as worker_lost, by the pod that reaped them.",
                (Query(rate("quiesce_orphans_reaped_total", "pod"), "{{pod}}"),),
                unit="reqps",
            ),
        ),
    ),
    Row(
        "Retries",
        (
            Panel(
                "Queued runs",
                "Runs waiting in the shared queue for another attempt (one series, from the "
                "replica that reports it; 0 when none is queued).",
                (Query(f"max(quiesce_queued_runs{{{NS}}}) or vector(0)", "queued"),),
                width=8,
            ),
            Panel(
                "Requeued runs by reason",
                "Attempts that ended with a reason their retry policy lists (shutdown, "
                "worker_lost, timeout, error), so the run was queued again.",
                (Query(rate("quiesce_runs_requeued_total", "reason"), "{{reason}}"),),
                unit="reqps",
                width=8,
                stacked=True,
            ),
            Panel(
                "Adopted runs by pod",
                "Queued runs each pod took for their next attempt.",
                (Query(rate("quiesce_runs_adopted_total", "pod"), "{{pod}}"),),
                unit="reqps",
                width=8,
            ),
        ),
    ),
    Row(
        "Admission and event streams",
        (
            Panel(
                "Rejections by reason",
                "Creates refused: capacity (429), draining and store_unavailable (503), "
                "invalid (400/413/415/422), unauthorized (401).",
                (Query(rate("quiesce_runs_rejected_total", "reason"), "{{reason}}"),),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Event streams vs budget",
                "Event streams open per pod, and QUIESCE_MAX_STREAMS (above it: 503).",
                (
                    Query(f"max by (pod) (quiesce_streams_active{{{SEL}}})", "{{pod}} open"),
                    Query(f"max by (pod) (quiesce_max_streams{{{SEL}}})", "{{pod}} budget"),
                ),
            ),
            Panel(
                "Refused streams and body timeouts",
                "Event streams refused with 503 at the budget, and requests answered 408 "
                "because their body did not arrive within QUIESCE_REQUEST_BODY_TIMEOUT_SECONDS.",
                (
                    Query(rate("quiesce_streams_rejected_total", "pod"), "{{pod}} streams (503)"),
                    Query(
                        rate("quiesce_request_body_timeouts_total", "pod"), "{{pod}} bodies (408)"
                    ),
                ),
                unit="reqps",
                width=24,
                height=6,
            ),
        ),
    ),
    Row(
        "Store and callbacks",
        (
            Panel(
                "Store errors by operation",
                "Store operations that failed because Redis was unreachable or refused.",
                (Query(rate("quiesce_store_errors_total", "operation"), "{{operation}}"),),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Store resets",
                "Times a pod found the store reset (Redis lost its data) in the time range.",
                (
                    Query(
                        f"sum by (pod) (increase(quiesce_store_resets_total{{{SEL}}}[$__range]))",
                        "{{pod}}",
                    ),
                ),
                kind="stat",
                width=6,
                threshold=1,
            ),
            Panel(
                "Callback outcomes",
                "Completion callbacks delivered, or failed after every retry.",
                (Query(rate("quiesce_callbacks_total", "outcome"), "{{outcome}}"),),
                unit="reqps",
                width=6,
                stacked=True,
            ),
            Panel(
                "Pod deletion cost updates",
                "Annotation updates that rank idle pods first for scale-in, when "
                "QUIESCE_POD_DELETION_COST is on; failed ones are retried with backoff.",
                (
                    Query(
                        rate("quiesce_pod_deletion_cost_updates_total", "pod, outcome"),
                        "{{pod}} {{outcome}}",
                    ),
                ),
                unit="reqps",
                width=24,
                height=6,
            ),
        ),
    ),
    Row(
        "HTTP",
        (
            Panel(
                "HTTP requests by route and status",
                "Requests per second by route template (unmatched: no route) and status.",
                (
                    Query(
                        rate("quiesce_http_requests_total", "route, status"),
                        "{{route}} {{status}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "HTTP latency by route",
                "p50 and p95 per route template. Event streams are left out: they count "
                "until the stream ends.",
                tuple(
                    Query(
                        quantile(
                            q,
                            "quiesce_http_request_duration_seconds",
                            "route",
                            f'route!="{STREAM_ROUTE}"',
                        ),
                        f"{{{{route}}}} p{round(q * 100)}",
                    )
                    for q in (0.5, 0.95)
                ),
                unit="s",
            ),
        ),
    ),
)


def field_config(panel: Panel) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if panel.threshold is not None:
        steps.append({"color": "red", "value": panel.threshold})
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "min": 0,
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if panel.stacked else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
            "thresholdsStyle": {"mode": "off" if panel.threshold is None else "line"},
        }
        defaults["color"] = {"mode": "palette-classic"}
    else:
        defaults["color"] = {"mode": "thresholds"}
    return {"defaults": defaults, "overrides": []}


def options(panel: Panel) -> dict[str, Any]:
    if panel.kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        }
    return {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": field_config(panel),
        "options": options(panel),
        "targets": [
            {
                "datasource": DATASOURCE,
                "editorMode": "code",
                "expr": query.expr,
                "legendFormat": query.legend,
                "range": True,
                "refId": chr(ord("A") + index),
            }
            for index, query in enumerate(panel.queries)
        ],
    }


def layout(rows: tuple[Row, ...]) -> list[dict[str, Any]]:
    """Rows one under the other; panels left to right, wrapping at Grafana's 24 columns."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row in rows:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, line_height = 0, y + line_height, 0
            panels.append(panel_json(panel, len(panels) + 1, x, y))
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return panels


def variable(name: str, label: str, query: str, *, multi: bool) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "sort": 1,
        "regex": "",
        "hide": 0,
        "multi": multi,
        "includeAll": multi,
        **({"allValue": ".*"} if multi else {}),
        "current": {},
        "options": [],
    }


def dashboard() -> dict[str, Any]:
    return {
        "id": None,
        "uid": "quiesce-overview",
        "title": "Quiesce",
        "description": "Runs, capacity, drains, store and callbacks of Quiesce workers.",
        "tags": ["quiesce"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "regex": "",
                    "hide": 0,
                    "current": {},
                    "options": [],
                },
                variable(
                    "namespace",
                    "Namespace",
                    "label_values(quiesce_active_runs, namespace)",
                    multi=False,
                ),
                variable(
                    "pod",
                    "Pod",
                    'label_values(quiesce_active_runs{namespace="$namespace"}, pod)',
                    multi=True,
                ),
            ]
        },
        "panels": layout(ROWS),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    wanted = render()
    if "--check" in argv:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != wanted:
            print(f"{OUTPUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
