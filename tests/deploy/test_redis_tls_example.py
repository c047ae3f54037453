"""deploy/k8s/components/redis-tls: a Component that mounts the Redis CA (and client
certificate) from a Secret and points the service at those files.

Applied here as kustomize applies it (a strategic merge of the patch onto the base's
Deployment: lists of env entries, volumes and mounts merged by name), then the pod's
environment is validated by the service's own Settings, with the mounted files
standing in a temporary directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Final

import pytest

from service.config import Settings
from tests.deploy.conftest import K8S, load_one, pod_environ

EXAMPLE: Final = K8S / "components" / "redis-tls"


def merge_by_name(base: list[dict[str, Any]], patch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged = {entry["name"]: entry for entry in base}
    for entry in patch:
        merged[entry["name"]] = {**merged.get(entry["name"], {}), **entry}
    return list(merged.values())


@pytest.fixture(scope="module")
def patched(base: dict[str, dict[str, Any]]) -> dict[str, Any]:
    component = load_one(EXAMPLE / "kustomization.yaml")
    assert component["kind"] == "Component"
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    (patch_entry,) = component["patches"]
    assert patch_entry["target"] == {"kind": "Deployment", "name": "quiesce"}
    patch = load_one(EXAMPLE / patch_entry["path"])
    deployment = copy.deepcopy(base["Deployment"])
    assert patch["metadata"]["name"] == deployment["metadata"]["name"]
    spec = deployment["spec"]["template"]["spec"]
    patch_spec = patch["spec"]["template"]["spec"]
    spec["volumes"] = merge_by_name(spec.get("volumes", []), patch_spec["volumes"])
    (patch_container,) = patch_spec["containers"]
    (container,) = spec["containers"]
    assert patch_container["name"] == container["name"]
    container["env"] = merge_by_name(container["env"], patch_container["env"])
    container["volumeMounts"] = merge_by_name(
        container.get("volumeMounts", []), patch_container["volumeMounts"]
    )
    return spec


def test_the_ca_comes_from_a_secret_mounted_read_only(patched: dict[str, Any]) -> None:
    volume = next(v for v in patched["volumes"] if v["name"] == "redis-tls")
    assert volume["secret"]["secretName"] == "quiesce-redis-tls"
    (container,) = patched["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "redis-tls")
    assert mount["readOnly"] is True
    # The files the service is pointed at are in that mount, under the Secret's keys;
    # the pod's group (fsGroup) may read them.
    env = {entry["name"]: entry for entry in container["env"]}
    for name, key in (
        ("QUIESCE_REDIS_CA_FILE", "ca.crt"),
        ("QUIESCE_REDIS_CERT_FILE", "tls.crt"),
        ("QUIESCE_REDIS_KEY_FILE", "tls.key"),
    ):
        assert env[name]["value"] == f"{mount['mountPath']}/{key}"
    assert volume["secret"]["defaultMode"] & 0o040
    assert patched["securityContext"]["fsGroup"]
    # The URL is still the Secret reference of the base.
    assert env["QUIESCE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"


def test_the_patched_environment_is_a_valid_configuration(
    patched: dict[str, Any], tmp_path: Path
) -> None:
    (container,) = patched["containers"]
    mount_path = next(m for m in container["volumeMounts"] if m["name"] == "redis-tls")["mountPath"]
    environ = pod_environ({entry["name"]: entry for entry in container["env"]})
    for name in ("QUIESCE_REDIS_CA_FILE", "QUIESCE_REDIS_CERT_FILE", "QUIESCE_REDIS_KEY_FILE"):
        stand_in = tmp_path / Path(environ[name]).relative_to(mount_path)
        stand_in.write_text("pem")
        environ[name] = str(stand_in)
    for url in (
        "rediss://:pw@master.example.cache.amazonaws.com:6379/0",
        "rediss+sentinel://:pw@redis-sentinel-0:26379,redis-sentinel-1:26379/mymaster",
    ):
        settings = Settings.from_env({**environ, "QUIESCE_REDIS_URL": url})
        assert settings.redis_ca_file == str(tmp_path / "ca.crt")
        assert settings.redis_min_replicas == 1
