"""The deploy files agree with each other and with the service they run.

Everything is read from the files themselves and checked against the real code:
the preStop command goes through the CLI's own parser, the probe paths must be
routes of the app, the Deployment's environment must pass ``Settings.from_env``,
and the HPA's metric must be one the app exports. Nothing here talks to a cluster
or a Docker engine; ``hadolint`` is used when present (required with
``QUIESCE_REQUIRE_TOOLS=1``), ``kubectl`` whenever it is present.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service import cli
from service.config import Settings
from service.metrics import Metrics
from tests.conftest import require_tool
from tests.deploy.conftest import (
    ADAPTER_RULES,
    DOCKERFILE,
    K8S,
    KEDA_EXAMPLE,
    ROOT,
    RecordingEnviron,
    dockerfile_instructions,
    final_stage,
    load_all,
    load_one,
    pod_environ,
)

START_COMMAND: Final = ["quiesce", "serve"]
HPA_METRIC: Final = "quiesce_active_runs"
#: What the drain may take after the grace: cancel the rest, finalize, exit.
FINALIZATION_MARGIN_SECONDS: Final = 2
EXPECTED_KINDS: Final = Counter(
    [
        "ServiceAccount",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "HorizontalPodAutoscaler",
    ]
)
#: Kinds Kubernetes ships: validated against its OpenAPI schemas.
BUILTIN_API_VERSIONS: Final = {
    "v1",
    "apps/v1",
    "policy/v1",
    "networking.k8s.io/v1",
    "autoscaling/v2",
}
#: Kinds from CRDs (no schema offline): checked structurally below.
CRD_API_VERSIONS: Final = {"monitoring.coreos.com/v1", "keda.sh/v1alpha1"}
#: The oldest Kubernetes the manifests target (also the floor of kubernetes-validate
#: in pyproject.toml, so its schemas always ship); the newest shipped is checked too.
OLDEST_KUBERNETES: Final = "1.33.0"
#: The container's one writable path (an emptyDir; the root filesystem is read-only).
TMP_DIR: Final = "/tmp"  # noqa: S108 - a mount point in the manifest, not a file we create
#: Paths the image build must never see.
NOT_IN_BUILD_CONTEXT: Final = (
    ".git/HEAD",
    ".venv/bin/python",
    ".env",
    "tests/conftest.py",
    "deploy/k8s/deployment.yaml",
    "service/__pycache__/cli.cpython-311.pyc",
)


def container_port(container: dict[str, Any], port: int | str) -> int:
    """Resolve a port reference (number or name) against the container's ports."""
    if isinstance(port, int):
        return port
    matches = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert len(matches) == 1, f"no single container port named {port!r}"
    resolved: int = matches[0]
    return resolved


def quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


# --- every file ---------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)
        if path in (K8S / "kustomization.yaml", ADAPTER_RULES):
            continue
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        assert doc["metadata"]["name"] == "quiesce"


def test_kustomization_lists_every_manifest_and_nothing_else() -> None:
    resources = load_one(K8S / "kustomization.yaml")["resources"]
    top_level = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(resources) == sorted(top_level)
    # Not Kubernetes objects of this app: the adapter's rule and the KEDA alternative.
    assert ADAPTER_RULES.is_file()
    assert KEDA_EXAMPLE.is_file()
    assert not any("prometheus-adapter" in r or "examples" in r for r in resources)


def test_base_holds_exactly_the_expected_kinds(base: dict[str, dict[str, Any]]) -> None:
    assert Counter(base.keys()) == EXPECTED_KINDS
    assert "Secret" not in base, "the Secret is created out of band, never committed"
    for kind, obj in base.items():
        assert obj["apiVersion"] in BUILTIN_API_VERSIONS | CRD_API_VERSIONS, kind


def test_builtin_kinds_match_the_kubernetes_schemas(
    base: dict[str, dict[str, Any]], kubernetes_validate: ModuleType
) -> None:
    versions = sorted({OLDEST_KUBERNETES, kubernetes_validate.latest_version()})
    builtin = [obj for obj in base.values() if obj["apiVersion"] in BUILTIN_API_VERSIONS]
    assert len(builtin) == 6
    errors = []
    for version in versions:
        for obj in builtin:
            try:
                # strict: an unknown (e.g. misspelled) field is an error, not ignored.
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                errors.append(f"{version} {obj['kind']}: {path}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_schema_validation_catches_a_misspelled_field(
    base: dict[str, dict[str, Any]], kubernetes_validate: ModuleType
) -> None:
    broken = copy.deepcopy(base["Deployment"])
    probe = broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)


def test_kustomize_builds_the_base_unchanged(base: dict[str, dict[str, Any]]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (the base is still validated file by file)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    assert Counter(doc["kind"] for doc in built) == EXPECTED_KINDS
    # Its one transformer, `labels:`, is applied by the fixture the same way: what is
    # applied is what the tests check.
    assert {doc["kind"]: doc for doc in built} == base


# --- the Deployment -------------------------------------------------------------


def prestop_command(container: dict[str, Any]) -> list[str]:
    command: list[str] = container["lifecycle"]["preStop"]["exec"]["command"]
    return command


def test_prestop_is_the_drain_command_of_the_real_cli(
    container: dict[str, Any], settings: Settings
) -> None:
    command = prestop_command(container)
    assert command[0] == "quiesce"
    args = cli.build_parser().parse_args(command[1:])
    assert args.command == "drain"
    assert args.run is cli.drain
    assert args.url is None, "the hook drains the local server (127.0.0.1:$PORT)"
    assert args.timeout is not None, "state the hook's timeout in the manifest"
    # The hook must wait for the whole drain: the grace, then cancel and finalize.
    assert args.timeout >= settings.shutdown_grace_seconds + FINALIZATION_MARGIN_SECONDS


def test_termination_grace_period_covers_the_hook_and_the_drain(
    pod_spec: dict[str, Any], container: dict[str, Any], settings: Settings
) -> None:
    hook_timeout = cli.build_parser().parse_args(prestop_command(container)[1:]).timeout
    budget = hook_timeout + settings.shutdown_grace_seconds + FINALIZATION_MARGIN_SECONDS
    assert pod_spec["terminationGracePeriodSeconds"] > budget


def test_every_env_entry_is_read_and_valid(
    env: dict[str, dict[str, Any]], settings: Settings
) -> None:
    environ = RecordingEnviron(pod_environ(env))
    assert Settings.from_env(environ) == settings
    # A misspelled name would be ignored silently by the service: catch it here.
    unread = set(env) - environ.read
    assert not unread, f"env entries the service never reads: {sorted(unread)}"
    assert settings.log_format == "json"
    assert settings.api_token is not None
    assert settings.redis_url is not None, "replicas share runs through Redis"
    assert settings.max_active_runs == 100
    assert settings.shutdown_grace_seconds == 25


def test_secrets_come_from_the_secret(env: dict[str, dict[str, Any]]) -> None:
    for name, key in (("QUIESCE_API_TOKEN", "api-token"), ("QUIESCE_REDIS_URL", "redis-url")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "quiesce"
        assert ref["key"] == key
        assert not ref.get("optional", False), f"{name} is required"
    for name, entry in env.items():
        if re.search(r"TOKEN|SECRET|REDIS_URL", name):
            assert "value" not in entry, f"{name} must come from a Secret, not a literal"


def test_worker_id_is_the_pod_name(env: dict[str, dict[str, Any]]) -> None:
    assert env["QUIESCE_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_probes_hit_real_routes(container: dict[str, Any], app_routes: dict[str, set[str]]) -> None:
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert path in app_routes, f"{probe}: {path} is not a route of the app"
        assert "GET" in app_routes[path]


def test_readiness_reacts_fast(container: dict[str, Any]) -> None:
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] <= 5
    assert readiness["failureThreshold"] == 1
    assert readiness["timeoutSeconds"] == 1


def test_ports_agree(
    base: dict[str, dict[str, Any]], container: dict[str, Any], settings: Settings
) -> None:
    (http,) = container["ports"]
    assert http["name"] == "http"
    assert http["containerPort"] == settings.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container_port(container, container[probe]["httpGet"]["port"]) == settings.port
    (service_port,) = base["Service"]["spec"]["ports"]
    assert service_port["port"] == 80
    assert container_port(container, service_port["targetPort"]) == settings.port
    (ingress,) = base["NetworkPolicy"]["spec"]["ingress"]
    assert [container_port(container, p["port"]) for p in ingress["ports"]] == [settings.port]
    # `quiesce serve` listens where the manifest says, on every interface.
    args = cli.build_parser().parse_args(container["command"][1:])
    argv = cli.granian_argv(settings, args.host)
    assert argv[argv.index("--port") + 1] == str(http["containerPort"])
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


def test_rollout_never_lowers_capacity(base: dict[str, dict[str, Any]]) -> None:
    spec = base["Deployment"]["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert str(spec["strategy"]["rollingUpdate"]["maxUnavailable"]) in ("0", "0%")
    assert "replicas" not in spec, "the HPA owns the replica count"


def test_security_context(
    base: dict[str, dict[str, Any]], pod_spec: dict[str, Any], container: dict[str, Any]
) -> None:
    pod = pod_spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001
    assert pod["runAsGroup"] == 10001
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    own = container["securityContext"]
    assert own["allowPrivilegeEscalation"] is False
    assert own["readOnlyRootFilesystem"] is True
    assert own["capabilities"]["drop"] == ["ALL"]
    assert own.get("privileged", False) is False
    assert own.get("runAsUser", pod["runAsUser"]) == 10001
    # The read-only root leaves /tmp as the one writable path.
    (mount,) = (m for m in container["volumeMounts"] if m["mountPath"] == TMP_DIR)
    (volume,) = (v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["serviceAccountName"] == base["ServiceAccount"]["metadata"]["name"]
    assert base["ServiceAccount"]["automountServiceAccountToken"] is False


def test_selectors_pick_the_pods(base: dict[str, dict[str, Any]]) -> None:
    deployment = base["Deployment"]["spec"]
    pod_labels = deployment["template"]["metadata"]["labels"]
    assert selects(deployment["selector"]["matchLabels"], pod_labels)
    assert selects(base["Service"]["spec"]["selector"], pod_labels)
    assert selects(base["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(base["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"], pod_labels)
    service_labels = base["Service"]["metadata"]["labels"]
    assert selects(base["ServiceMonitor"]["spec"]["selector"]["matchLabels"], service_labels)


# --- metrics and autoscaling ----------------------------------------------------


def test_the_autoscaling_metric_is_exported_as_a_gauge() -> None:
    text = Metrics(max_active_runs=100, task_names=["sleep"]).render().decode()
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert families.get(HPA_METRIC) == "gauge"


def test_servicemonitor_scrapes_the_metrics_route(
    base: dict[str, dict[str, Any]], app_routes: dict[str, set[str]]
) -> None:
    monitor = base["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    service_port_names = {p["name"] for p in base["Service"]["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_port_names
    assert endpoint["path"] == "/metrics"
    assert "GET" in app_routes["/metrics"]


def test_hpa_scales_the_deployment_on_active_runs(
    base: dict[str, dict[str, Any]], settings: Settings
) -> None:
    spec = base["HorizontalPodAutoscaler"]["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == base["Deployment"]["metadata"]["name"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == HPA_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    # Ask for pods before the existing ones reach their admission limit (429).
    assert quantity(metric["pods"]["target"]["averageValue"]) < settings.max_active_runs
    assert spec["minReplicas"] >= 2
    assert spec["maxReplicas"] >= spec["minReplicas"]


def test_hpa_scales_down_slowly(base: dict[str, dict[str, Any]]) -> None:
    behavior = base["HorizontalPodAutoscaler"]["spec"]["behavior"]
    assert behavior["scaleUp"]["policies"]
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] > 300, "longer than the default window"
    assert down["policies"]
    for policy in down["policies"]:
        assert (policy["type"], policy["value"]) == ("Pods", 1)


def test_adapter_rule_serves_the_metric_per_pod(base: dict[str, dict[str, Any]]) -> None:
    rules = load_one(ADAPTER_RULES)["rules"]["custom"]
    (rule,) = (r for r in rules if HPA_METRIC in r["seriesQuery"])
    overrides = rule["resources"]["overrides"]
    assert overrides["namespace"] == {"resource": "namespace"}
    assert overrides["pod"] == {"resource": "pod"}
    assert re.search(r'namespace!=""', rule["seriesQuery"])
    assert re.search(r'pod!=""', rule["seriesQuery"])
    hpa_metric = base["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == hpa_metric
    assert re.fullmatch(rule["name"]["matches"], HPA_METRIC)
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


def test_keda_example_is_an_alternative_on_the_same_metric(
    base: dict[str, dict[str, Any]], settings: Settings
) -> None:
    scaled = load_one(KEDA_EXAMPLE)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["kind"] == "ScaledObject"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == base["Deployment"]["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] >= 1, "a webhook needs a pod to land on"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    metadata = trigger["metadata"]
    assert HPA_METRIC in metadata["query"]
    assert f'job="{base["Service"]["metadata"]["name"]}"' in metadata["query"]
    assert quantity(metadata["threshold"]) < settings.max_active_runs
    assert metadata["serverAddress"].startswith(("http://", "https://"))


# --- one start command everywhere, and the image ------------------------------


def test_procfile_dockerfile_and_deployment_start_the_same_command(
    container: dict[str, Any],
) -> None:
    lines = (ROOT / "Procfile").read_text(encoding="utf-8").splitlines()
    (web,) = (line for line in lines if line.startswith("web:"))
    procfile = web.removeprefix("web:").split()
    (cmd,) = (arguments for keyword, arguments in final_stage() if keyword == "CMD")
    dockerfile = json.loads(cmd)  # exec form: a JSON array, no shell
    assert procfile == dockerfile == container["command"] == START_COMMAND
    assert cli.build_parser().parse_args(START_COMMAND[1:]).run is cli.serve


def test_dockerfile_builds_on_a_pinned_base_argument() -> None:
    instructions = dockerfile_instructions()
    first_from = next(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    global_args = dict(
        arguments.partition("=")[::2]
        for keyword, arguments in instructions[:first_from]
        if keyword == "ARG"
    )
    images = [arguments.split()[0] for keyword, arguments in instructions if keyword == "FROM"]
    assert len(images) == 2, "a build stage and a final stage"
    (name,) = {image.strip("${}") for image in images}
    assert images == [f"${{{name}}}"] * 2, "both stages use the base image argument"
    default = global_args[name]
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", default), f"not pinned: {default}"


def test_final_image_runs_unprivileged_and_stops_on_sigterm(
    pod_spec: dict[str, Any], settings: Settings
) -> None:
    stage = final_stage()
    values = dict(stage)
    assert values["STOPSIGNAL"] == "SIGTERM"
    user, _, group = values["USER"].partition(":")
    assert user.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    assert int(user) != 0
    assert int(user) == pod_spec["securityContext"]["runAsUser"]
    assert int(group) == pod_spec["securityContext"]["runAsGroup"]
    assert values["EXPOSE"] == str(settings.port)
    env_line = " ".join(arguments for keyword, arguments in stage if keyword == "ENV")
    assert f"PORT={settings.port}" in env_line.split()
    copies = [arguments for keyword, arguments in stage if keyword == "COPY"]
    assert copies
    assert all(arguments.startswith("--from=") for arguments in copies), (
        "the final stage takes only the built venv, never the source tree"
    )


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or a parent wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_what_the_build_copies_and_nothing_else() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [
        source
        for keyword, arguments in dockerfile_instructions()
        if keyword == "COPY" and not arguments.startswith("--from=")
        for source in arguments.split()[:-1]
    ]
    assert copied, "the build stage copies the project"
    for source in copied:
        path = ROOT / source
        assert path.exists(), f"the Dockerfile copies {source}, which does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in relative:
                continue
            assert not dockerignore_excludes(relative, patterns), relative
    for unwanted in NOT_IN_BUILD_CONTEXT:
        assert dockerignore_excludes(unwanted, patterns), unwanted


def test_hadolint_finds_nothing() -> None:
    hadolint = require_tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""
