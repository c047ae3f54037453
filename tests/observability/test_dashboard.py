"""The Grafana dashboard as a file: exactly what its generator writes, importable into
Grafana 10+ with any Prometheus data source, and covering every metric the service
exports. Its queries run against a real Prometheus in test_dashboard_queries.py."""

from __future__ import annotations

import re
from typing import Any

from service.metrics import Metrics
from tests.observability.conftest import (
    DASHBOARD,
    ROOT,
    dashboard,
    load_script,
    panels,
    readme_section,
)


def test_committed_json_is_the_generated_one() -> None:
    generator = load_script(ROOT / "deploy" / "grafana" / "generate_dashboard.py")
    assert DASHBOARD.read_text(encoding="utf-8") == generator.render(), (
        "stale: run python deploy/grafana/generate_dashboard.py"
    )


def test_dashboard_has_the_variables_grafana_needs() -> None:
    board = dashboard()
    assert board["id"] is None, "an id would clash on import"
    assert board["uid"]
    assert board["schemaVersion"] >= 36  # Grafana 9.0+ reads it; 39 is Grafana 10.x
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "pod"]
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == (
        "datasource",
        "prometheus",
    )
    assert "__inputs" not in board, "a sidecar cannot fill in __inputs; the variable does"
    for name in ("namespace", "pod"):
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variables[name]["query"]["query"].startswith("label_values(")
    assert variables["pod"]["multi"]
    assert variables["pod"]["includeAll"]


def test_every_panel_queries_the_chosen_datasource_and_pods() -> None:
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert 'namespace="$namespace"' in target["expr"], panel["title"]
            # The HPA sees every pod; the queue is one for the whole namespace.
            if panel["title"] not in ("HPA signal", "Queued runs"):
                assert 'pod=~"$pod"' in target["expr"], panel["title"]
            # A rate over a fixed window would show nothing at Grafana's wider steps.
            assert not re.search(r"\[\d+[smh]\]", target["expr"]), target["expr"]


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    all_panels: list[dict[str, Any]] = dashboard()["panels"]
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in all_panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_exported_metric_is_on_the_dashboard() -> None:
    exported = {
        family.name
        for family in Metrics(max_active_runs=1, task_names=["sleep"]).registry.collect()
    }
    queries = " ".join(t["expr"] for panel in panels() for t in panel["targets"])
    used = set(re.findall(r"quiesce_[a-z_]+", queries))
    # A counter's family is named without _total; a histogram is read through _bucket.
    used |= {name.removesuffix("_total") for name in used}
    used |= {name.removesuffix("_bucket") for name in used}
    assert exported - used == set()


def test_readme_lists_every_panel() -> None:
    section = readme_section()
    for panel in panels():
        assert panel["title"] in section, f"README does not list the panel {panel['title']!r}"
