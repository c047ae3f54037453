"""How the deploy tests read the deploy files: the kustomize base, the Deployment's
pod, its environment as the service would see it, the app's routes, the Dockerfile.

Tools (``hadolint``, the ``kubernetes-validate`` library) are used when installed; a
test that needs a missing one is skipped, or fails when ``QUIESCE_REQUIRE_TOOLS=1``
(CI, where they must exist). ``kubectl`` is optional everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import pytest
import yaml

from service.config import Settings
from service.web.app import create_app
from tests.conftest import REQUIRE_TOOLS

ROOT: Final = Path(__file__).resolve().parents[2]
K8S: Final = ROOT / "deploy" / "k8s"
ADAPTER_RULES: Final = K8S / "prometheus-adapter" / "rules.yaml"
KEDA_EXAMPLE: Final = K8S / "examples" / "keda-scaledobject.yaml"
DOCKERFILE: Final = ROOT / "Dockerfile"


#: Values for the Deployment's env entries that come from the cluster.
SECRET_PLACEHOLDERS: Final = {
    "api-token": "a-test-api-token-0123456789",
    "redis-url": "redis://redis.quiesce.svc:6379/0",
}
POD_NAME_PLACEHOLDER: Final = "quiesce-7d9f8b6c5d-x2k4p"

# --- loading ------------------------------------------------------------------


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    assert isinstance(docs[0], dict)
    return docs[0]


def apply_labels(objects: dict[str, dict[str, Any]], entries: list[dict[str, Any]]) -> None:
    """Kustomize's ``labels:`` transformer, for the options the base uses.

    Each entry's pairs go on every object's metadata and, with ``includeTemplates``,
    on pod templates; never on selectors (``includeSelectors`` stays false, which
    the tests check). ``test_kustomize_builds_the_base_unchanged`` compares the
    result with what ``kubectl kustomize`` builds, whenever kubectl is present.
    """
    for entry in entries:
        assert not entry.get("includeSelectors", False), "selectors are written in the files"
        pairs = {key: str(value) for key, value in entry["pairs"].items()}
        for obj in objects.values():
            obj["metadata"].setdefault("labels", {}).update(pairs)
            template = obj.get("spec", {}).get("template")
            if entry.get("includeTemplates", False) and template is not None:
                template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


@pytest.fixture(scope="module")
def base() -> dict[str, dict[str, Any]]:
    """The kustomize base's objects by kind, as it builds them: read from the files
    it lists, with its ``labels:`` applied."""
    kustomization = load_one(K8S / "kustomization.yaml")
    objects: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_all(K8S / name):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects in the base"
            objects[doc["kind"]] = doc
    apply_labels(objects, kustomization.get("labels", []))
    return objects


@pytest.fixture(scope="module")
def pod_spec(base: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = base["Deployment"]["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec["containers"]
    assert len(containers) == 1, "one container per pod: the service"
    main: dict[str, Any] = containers[0]
    return main


@pytest.fixture(scope="module")
def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = container["env"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"duplicate env entries: {names}"
    return {entry["name"]: entry for entry in entries}


class RecordingEnviron(Mapping[str, str]):
    """An environment that remembers which names were looked up."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.read.add(name)
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def pod_environ(env: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The environment a pod of the Deployment gets (cluster values as placeholders)."""
    values: dict[str, str] = {}
    for name, entry in env.items():
        if "value" in entry:
            values[name] = str(entry["value"])
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", name
            values[name] = POD_NAME_PLACEHOLDER
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if ref.get("optional"):
                continue  # unset unless the operator adds the key
            assert ref["key"] in SECRET_PLACEHOLDERS, f"{name}: unexpected secret key {ref['key']}"
            values[name] = SECRET_PLACEHOLDERS[ref["key"]]
        else:
            pytest.fail(f"{name}: unexpected valueFrom {source}")
    return values


@pytest.fixture(scope="module")
def settings(env: dict[str, dict[str, Any]]) -> Settings:
    """The Deployment's configuration, validated by the service's own code."""
    return Settings.from_env(pod_environ(env))


@pytest.fixture(scope="module")
def app_routes() -> dict[str, set[str]]:
    """Path → HTTP methods of the real app (built, lifespan not started)."""
    app = create_app(Settings(worker_id="test"))
    return {route.path: set(getattr(route, "methods", ())) for route in app.routes}


@pytest.fixture(scope="module")
def kubernetes_validate() -> ModuleType:
    try:
        import kubernetes_validate  # an optional tool: skip (or fail) without it
    except ImportError:
        message = "kubernetes-validate is not installed"
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    return kubernetes_validate


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        pending = ""
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]
