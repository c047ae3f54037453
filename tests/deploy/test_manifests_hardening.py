"""What a careful operator asks of the manifests beyond "they apply and they drain".

* The NetworkPolicy names the destinations of every egress rule: Redis only at the
  pods (or address) it selects, callbacks on the ports their URLs use (80 and 443,
  so an ``http://`` callback is not silently dropped), DNS kept.
* The recommended ``app.kubernetes.io/*`` labels are on every object and on the pod
  template, while every selector keeps the two stable labels it always had (a
  Deployment's selector is immutable: a mutable label in it breaks ``kubectl apply``).
* The pods are spread across zones and nodes, as a preference.
* The overlay patch that deploy/k8s/README.md gives for another callback port lands
  in the callback rule (checked with ``kubectl kustomize`` when kubectl is present).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import pytest
import yaml

from service import __version__
from tests.deploy.conftest import K8S, SECRET_PLACEHOLDERS, load_one

#: The labels every selector uses, unchanged since the first release.
STABLE_SELECTOR: Final = {
    "app.kubernetes.io/name": "quiesce",
    "app.kubernetes.io/component": "worker",
}
RECOMMENDED_LABELS: Final = frozenset(
    {
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/component",
        "app.kubernetes.io/part-of",
        "app.kubernetes.io/managed-by",
    }
)
#: The ports callback and ``http`` task URLs use by default: http:// and https://.
CALLBACK_PORTS: Final = {80, 443}
METADATA_ADDRESS: Final = ipaddress.ip_address("169.254.169.254")
REDIS_PORT: Final = urlsplit(SECRET_PLACEHOLDERS["redis-url"]).port or 6379
SPREAD_KEYS: Final = {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


def egress_rules(base: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = base["NetworkPolicy"]["spec"]["egress"]
    return rules


def ports_of(rule: dict[str, Any]) -> set[tuple[int | str, str]]:
    return {(port["port"], port.get("protocol", "TCP")) for port in rule.get("ports", [])}


def rules_with_port(base: dict[str, dict[str, Any]], port: int) -> list[dict[str, Any]]:
    return [rule for rule in egress_rules(base) if (port, "TCP") in ports_of(rule)]


def ip_blocks(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [peer["ipBlock"] for peer in rule.get("to", []) if "ipBlock" in peer]


# --- egress ---------------------------------------------------------------------


def test_every_egress_rule_names_its_destinations_and_ports(
    base: dict[str, dict[str, Any]],
) -> None:
    assert "Egress" in base["NetworkPolicy"]["spec"]["policyTypes"]
    for rule in egress_rules(base):
        assert rule.get("to"), f"an egress rule open to every destination: {rule}"
        assert rule.get("ports"), f"an egress rule open on every port: {rule}"


def test_redis_egress_goes_only_to_the_selected_redis(base: dict[str, dict[str, Any]]) -> None:
    (rule,) = rules_with_port(base, REDIS_PORT)
    assert ports_of(rule) == {(REDIS_PORT, "TCP")}
    for peer in rule["to"]:
        assert peer.keys() <= {"podSelector", "namespaceSelector", "ipBlock"}
        if "ipBlock" in peer:
            network = ipaddress.ip_network(peer["ipBlock"]["cidr"])
            assert network.prefixlen > 0, "an ipBlock for Redis is its address, not the world"
            continue
        # An empty selector ({}) would select every pod (or namespace).
        selectors = [peer[key] for key in ("podSelector", "namespaceSelector") if key in peer]
        assert selectors
        for selector in selectors:
            assert selector.get("matchLabels") or selector.get("matchExpressions"), peer
        pod_selector = peer.get("podSelector", {}).get("matchLabels", {})
        assert pod_selector != STABLE_SELECTOR, "the Redis rule selects Quiesce itself"


def test_callback_egress_allows_http_and_https(base: dict[str, dict[str, Any]]) -> None:
    rules = [rule for rule in egress_rules(base) if ip_blocks(rule)]
    allowed = {port for rule in rules for port, protocol in ports_of(rule) if protocol == "TCP"}
    assert allowed >= CALLBACK_PORTS, "an http:// callback would be dropped silently"
    for rule in rules:
        for block in ip_blocks(rule):
            excepted = [ipaddress.ip_network(cidr) for cidr in block.get("except", [])]
            if METADATA_ADDRESS in ipaddress.ip_network(block["cidr"]):
                assert any(METADATA_ADDRESS in network for network in excepted), block


def test_dns_egress_is_kept(base: dict[str, dict[str, Any]]) -> None:
    (rule,) = (rule for rule in egress_rules(base) if (53, "UDP") in ports_of(rule))
    assert ports_of(rule) == {(53, "UDP"), (53, "TCP")}
    (peer,) = rule["to"]
    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"
    }


# --- labels ---------------------------------------------------------------------


def test_recommended_labels_on_every_object_and_the_pod_template(
    base: dict[str, dict[str, Any]],
) -> None:
    for kind, obj in base.items():
        labels = obj["metadata"]["labels"]
        assert labels.keys() >= RECOMMENDED_LABELS, f"{kind}: {sorted(labels)}"
        assert labels.items() >= STABLE_SELECTOR.items(), kind
    template_labels = base["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert template_labels.keys() >= RECOMMENDED_LABELS
    assert template_labels == base["Deployment"]["metadata"]["labels"]


def test_version_label_is_the_release_and_the_image_tag(base: dict[str, dict[str, Any]]) -> None:
    deployment = base["Deployment"]
    version = deployment["metadata"]["labels"]["app.kubernetes.io/version"]
    assert version == __version__
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].rpartition(":")[2] == version


def test_selectors_keep_only_the_stable_labels(base: dict[str, dict[str, Any]]) -> None:
    pod_spec = base["Deployment"]["spec"]["template"]["spec"]
    selectors = {
        "Deployment": base["Deployment"]["spec"]["selector"]["matchLabels"],
        "Service": base["Service"]["spec"]["selector"],
        "PodDisruptionBudget": base["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": base["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
        "ServiceMonitor": base["ServiceMonitor"]["spec"]["selector"]["matchLabels"],
    }
    for index, constraint in enumerate(pod_spec["topologySpreadConstraints"]):
        selectors[f"topologySpreadConstraints[{index}]"] = constraint["labelSelector"][
            "matchLabels"
        ]
    for where, selector in selectors.items():
        assert selector == STABLE_SELECTOR, where
    assert "matchExpressions" not in base["Deployment"]["spec"]["selector"]


def test_kustomize_adds_the_mutable_labels_outside_selectors() -> None:
    entries = load_one(K8S / "kustomization.yaml")["labels"]
    added = set()
    for entry in entries:
        assert entry["includeSelectors"] is False, "a selector must never change"
        assert entry["includeTemplates"] is True, "the pods carry the labels too"
        added |= entry["pairs"].keys()
    assert added == RECOMMENDED_LABELS - STABLE_SELECTOR.keys()


# --- spreading ------------------------------------------------------------------


def test_pods_spread_over_zones_and_nodes(base: dict[str, dict[str, Any]]) -> None:
    template = base["Deployment"]["spec"]["template"]
    constraints = template["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == SPREAD_KEYS
    assert len(constraints) == len(SPREAD_KEYS)
    pod_labels = template["metadata"]["labels"]
    for constraint in constraints:
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway", "a preference, never Pending"
        assert constraint["maxSkew"] == 1
        selector = constraint["labelSelector"]["matchLabels"]
        assert selector.items() <= pod_labels.items(), "the constraint must count these pods"
        # Counted per ReplicaSet, so the old pods of a rollout do not skew the new ones.
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]


# --- the documented patch for another callback port -------------------------------


def readme_patch() -> str:
    """The `patches:` block of deploy/k8s/README.md's "Network policy" section."""
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Network policy") :]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    (patch,) = (block for block in blocks if block.startswith("patches:"))
    return patch


def test_the_documented_port_patch_extends_the_callback_rule(tmp_path: Path) -> None:
    patch = yaml.safe_load(readme_patch())["patches"]
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    # Kustomize takes a base only by a relative path.
    overlay = {"resources": [os.path.relpath(K8S, tmp_path)], "patches": patch}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
    result = subprocess.run(
        [kubectl, "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (policy,) = (d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "NetworkPolicy")
    (added,) = {op["value"]["port"] for p in patch for op in yaml.safe_load(p["patch"])}
    rules = policy["spec"]["egress"]
    (extended,) = (rule for rule in rules if (added, "TCP") in ports_of(rule))
    assert ports_of(extended) >= {(port, "TCP") for port in CALLBACK_PORTS}
    assert ip_blocks(extended), "the port was added to the callback rule"
