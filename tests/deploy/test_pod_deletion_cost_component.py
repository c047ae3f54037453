"""The optional kustomize component for busy-aware scale-in
(``deploy/k8s/components/pod-deletion-cost``): least privilege, bound to the pods'
own ServiceAccount, and a Deployment whose environment the service accepts.

Its files are checked on their own; with ``kubectl`` present, an overlay of the base
plus the component is built and the result checked as a whole.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import pytest
import yaml

from service.config import Settings
from tests.deploy.conftest import (
    K8S,
    POD_NAME_PLACEHOLDER,
    RecordingEnviron,
    load_all,
    load_one,
    pod_environ,
)
from tests.deploy.test_manifests import EXPECTED_KINDS, OLDEST_KUBERNETES

COMPONENT: Final = K8S / "components" / "pod-deletion-cost"
NAMESPACE: Final = "jobs"


@pytest.fixture(scope="module")
def component() -> dict[str, Any]:
    kustomization = load_one(COMPONENT / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert kustomization["kind"] == "Component"
    return kustomization


@pytest.fixture(scope="module")
def objects(component: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The component's own objects by kind."""
    found: dict[str, dict[str, Any]] = {}
    for name in component["resources"]:
        for doc in load_all(COMPONENT / name):
            assert doc["kind"] not in found
            found[doc["kind"]] = doc
    assert set(found) == {"Role", "RoleBinding"}
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of an overlay: the base, the component, a namespace."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (the component's files are still checked)")
    overlay = tmp_path_factory.mktemp("overlay")
    base = os.path.relpath(K8S, overlay)  # kustomize refuses absolute paths
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": [base],
        "components": [os.path.relpath(COMPONENT, overlay)],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    command = [kubectl, "kustomize", str(overlay)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def test_the_role_grants_exactly_get_and_patch_on_pods(objects: dict[str, dict[str, Any]]) -> None:
    role = objects["Role"]
    assert role["kind"] == "Role", "namespaced: the pod's own namespace only"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}]


def test_the_binding_names_the_role_and_the_deployments_service_account(
    objects: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]]
) -> None:
    binding = objects["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": objects["Role"]["metadata"]["name"],
    }
    account = base["ServiceAccount"]["metadata"]["name"]
    assert base["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == account
    # No namespace: a RoleBinding's subject then means its own namespace.
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]


def test_the_component_objects_validate(
    objects: dict[str, dict[str, Any]], kubernetes_validate: ModuleType
) -> None:
    errors = []
    for version in sorted({OLDEST_KUBERNETES, kubernetes_validate.latest_version()}):
        for obj in objects.values():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{version} {obj['kind']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_overlay_builds_with_the_component(built: list[dict[str, Any]]) -> None:
    kinds = Counter(doc["kind"] for doc in built)
    assert kinds == EXPECTED_KINDS + Counter(["Role", "RoleBinding"])
    [binding] = [doc for doc in built if doc["kind"] == "RoleBinding"]
    assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert all(doc["metadata"]["namespace"] == NAMESPACE for doc in built)


def test_the_network_policy_also_lets_the_pods_reach_the_api_server(
    built: list[dict[str, Any]], base: dict[str, dict[str, Any]], kubernetes_validate: ModuleType
) -> None:
    [policy] = [doc for doc in built if doc["kind"] == "NetworkPolicy"]
    kubernetes_validate.validate(policy, OLDEST_KUBERNETES, strict=True)
    *unchanged, added = policy["spec"]["egress"]
    assert unchanged == base["NetworkPolicy"]["spec"]["egress"]
    assert added["ports"] == [{"port": 6443, "protocol": "TCP"}]
    assert "169.254.169.254/32" in added["to"][0]["ipBlock"]["except"]


def test_the_built_deployment_mounts_the_token_and_turns_the_feature_on(
    built: list[dict[str, Any]], kubernetes_validate: ModuleType, tmp_path: Path
) -> None:
    [deployment] = [doc for doc in built if doc["kind"] == "Deployment"]
    kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    [container] = pod["containers"]
    env = {entry["name"]: entry for entry in container["env"]}
    assert len(env) == len(container["env"]), "duplicate env entries"
    assert env["QUIESCE_POD_DELETION_COST"]["value"] == "true"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The environment the service gets in such a pod, with what Kubernetes adds
    # (the API server's address, enableServiceLinks or not) and mounts.
    for name, text in (("token", "t"), ("ca.crt", "PEM"), ("namespace", NAMESPACE)):
        (tmp_path / name).write_text(text, encoding="utf-8")
    environ = RecordingEnviron(
        {
            **pod_environ(env),
            "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
        }
    )
    settings = Settings.from_env(environ, service_account_dir=str(tmp_path))
    assert not set(env) - environ.read, "an env entry the service never reads"
    cost = settings.pod_deletion_cost
    assert cost is not None
    assert cost.pod_name == POD_NAME_PLACEHOLDER
    assert cost.namespace == NAMESPACE
    assert cost.api_url == "https://10.96.0.1:443"
