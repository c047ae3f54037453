"""The alerts and recording rules: valid for Prometheus (``promtool check rules``), each
alert proven by ``promtool test rules`` to fire and to stay silent, documented in the
README, and shipped identically as a plain file and as a PrometheusRule."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool
from tests.observability.conftest import (
    COMPONENT,
    ROOT,
    RULE_TESTS,
    RULES,
    alerts,
    anchors,
    load_script,
    readme_section,
    recording_rules,
    rule_groups,
)


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS.glob("*.yaml"))


def alert_cases() -> list[dict[str, Any]]:
    """Every ``alert_rule_test`` entry of every unit test file."""
    cases = []
    for path in rule_test_files():
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            cases.extend(test.get("alert_rule_test", []))
    return cases


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def test_promtool_checks_the_rules() -> None:
    result = run([require_tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts()) + len(recording_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    files = rule_test_files()
    assert files
    result = run([require_tool("promtool"), "test", "rules", *map(str, files)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout


def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    """A firing expectation turned upside down must make promtool fail: the tests do
    compare what the rules produce."""
    (source,) = rule_test_files()
    tests = yaml.safe_load(source.read_text(encoding="utf-8"))
    tests["rule_files"] = [str(RULES)]
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            case["exp_alerts"] = [] if case["exp_alerts"] else [{"exp_labels": {"pod": "x"}}]
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(tests), encoding="utf-8")
    result = run([require_tool("promtool"), "test", "rules", str(broken)])
    assert result.returncode != 0
    for alert in alerts():
        assert f"alertname: {alert['alert']}" in result.stdout + result.stderr


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_every_alert_is_tested_firing_and_silent(alert: dict[str, Any]) -> None:
    cases = [case for case in alert_cases() if case["alertname"] == alert["alert"]]
    assert any(case["exp_alerts"] for case in cases), "no test where it fires"
    assert any(not case["exp_alerts"] for case in cases), "no test where it stays silent"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_every_alert_names_the_pod_and_links_its_runbook(alert: dict[str, Any]) -> None:
    annotations = alert["annotations"]
    assert annotations["summary"].strip()
    assert "{{ $labels.pod }}" in annotations["description"]
    assert alert["labels"]["severity"] in {"warning", "critical"}
    # Alerts are per pod: the expression keeps the pod label.
    assert "by (namespace, pod)" in alert["expr"] or "namespace_pod" in alert["expr"]
    path, _, anchor = annotations["runbook_url"].partition("#")
    assert path == "README.md"
    assert anchor == alert["alert"].lower()
    assert anchor in anchors(readme_section()), f"README has no heading for #{anchor}"


def test_readme_explains_every_alert_and_nothing_else() -> None:
    section = readme_section()
    headed = {
        line.removeprefix("#### ").strip()
        for line in section.splitlines()
        if line.startswith("#### Quiesce")
    }
    assert headed == {alert["alert"] for alert in alerts()}


def test_recording_rules_follow_the_naming_convention_and_are_used() -> None:
    """level:metric:operations; each is read by an alert (a rule nobody reads is cost)."""
    expressions = " ".join(alert["expr"] for alert in alerts())
    for rule in recording_rules():
        level, metric, operations = rule["record"].split(":")
        assert level.startswith("namespace_pod")
        assert metric.startswith("quiesce_")
        assert operations
        assert rule["record"] in expressions, f"{rule['record']} is not used"


def test_the_prometheusrule_is_the_plain_file() -> None:
    render = load_script(ROOT / "deploy" / "prometheus" / "render_prometheusrule.py")
    committed = (COMPONENT / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert committed == render.render(RULES.read_text(encoding="utf-8")), (
        "stale: run python deploy/prometheus/render_prometheusrule.py"
    )
    rule = yaml.safe_load(committed)
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == {"groups": rule_groups()}


def test_the_component_adds_the_prometheusrule_to_an_overlay(tmp_path: Path) -> None:
    component = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text(encoding="utf-8"))
    assert (component["apiVersion"], component["kind"]) == (
        "kustomize.config.k8s.io/v1alpha1",
        "Component",
    )
    assert component["resources"] == ["prometheusrule.yaml"]
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (the component's files are still checked)")
    # kustomize takes only relative paths to other kustomizations.
    base = os.path.relpath(ROOT / "deploy" / "k8s", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [base],
                "components": [os.path.relpath(COMPONENT, tmp_path)],
                "namespace": "quiesce",
            }
        ),
        encoding="utf-8",
    )
    result = run([kubectl, "kustomize", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    (rule,) = (doc for doc in built if doc["kind"] == "PrometheusRule")
    assert rule["metadata"]["namespace"] == "quiesce"
    assert rule["spec"] == {"groups": rule_groups()}
    assert any(doc["kind"] == "Deployment" for doc in built)
