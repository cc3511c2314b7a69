"""The Kubernetes manifests render, validate offline, and agree with the code they deploy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipsearch.settings import Settings, load_settings
from tests.devtools import ROOT, require

OVERLAYS = ("dev-cpu", "prod-gpu")


def _render(target: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [require("kustomize"), "build", str(ROOT / "k8s" / target)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, _render(f"overlays/{request.param}")


def _settings(objects: list[dict[str, Any]], tmp_path: Path) -> Settings:
    configmap = _one(objects, "ConfigMap")
    path = tmp_path / "settings.yaml"
    path.write_text(configmap["data"]["settings.yaml"])
    return load_settings(path)


def test_every_overlay_validates_against_the_vendored_schemas(tmp_path: Path) -> None:
    require("kustomize")
    require("kubeconform")
    proc = subprocess.run(
        [str(ROOT / "scripts/k8s_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("Invalid: 0, Errors: 0") == 3, proc.stdout


def test_settings_configmap_loads_and_fits_the_cluster(overlay, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, objects = overlay
    settings = _settings(objects, tmp_path)  # extra="forbid": an unknown key fails here
    assert settings.ray_address == "auto" and settings.gateway.host == "0.0.0.0"
    cluster = _one(objects, "RayCluster")
    index = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "index")
    mounts = index["template"]["spec"]["containers"][0]["volumeMounts"]
    shard_mount = next(m for m in mounts if m["name"] == "shards")["mountPath"]
    assert settings.data_dir.is_relative_to(shard_mount), "shard data must be on the volume"
    claim = next(v for v in index["template"]["spec"]["volumes"] if v["name"] == "shards")
    assert _one(objects, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])


def test_gateway_probes_use_the_health_port_and_service_the_grpc_port(
    overlay, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    _, objects = overlay
    port = _settings(objects, tmp_path).gateway.port
    health_port = _settings(objects, tmp_path).gateway.health_port
    assert health_port and health_port != port  # plaintext probes hold with TLS on too
    gateway = _one(objects, "Deployment", "clipsearch-gateway")["spec"]["template"]["spec"]
    container = gateway["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
    assert {"name": "grpc", "containerPort": port} in container["ports"]
    assert {"name": "health", "containerPort": health_port} in container["ports"]
    metrics = _settings(objects, tmp_path).gateway.observability.metrics_port
    assert {"name": "metrics", "containerPort": metrics} in container["ports"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    service = _one(objects, "Service", "clipsearch-gateway")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]
    hpa = _one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "clipsearch-gateway"
    assert (
        _one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
        == (service["spec"]["selector"])
    )


def test_gateway_is_exposed_only_with_auth(overlay, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """It binds 0.0.0.0, which the gateway refuses without auth: the tokens Secret is required
    and its key is the setting that turns auth on."""
    from gateway.auth import authenticator_for
    from gateway.server import check_exposure

    name, objects = overlay
    container = _one(objects, "Deployment", "clipsearch-gateway")["spec"]["template"]["spec"][
        "containers"
    ][0]
    (ref,) = [e["secretRef"] for e in container["envFrom"]]
    assert ref["name"].startswith("clipsearch-gateway-tokens") and not ref.get("optional")
    if name == "dev-cpu":
        secret = _one(objects, "Secret", ref["name"])
        assert set(secret["data"]) == {"CLIPSEARCH_GATEWAY__AUTH__TOKENS"}
    monkeypatch.setenv("CLIPSEARCH_GATEWAY__AUTH__TOKENS", "read,write,admin=t0ken")
    settings = _settings(objects, tmp_path)
    auth = authenticator_for(settings.gateway.auth)
    assert auth is not None
    check_exposure(settings, auth_on=True, tls_on=False)
    monkeypatch.delenv("CLIPSEARCH_GATEWAY__AUTH__TOKENS")
    with pytest.raises(ValueError, match="refusing to bind"):
        check_exposure(_settings(objects, tmp_path), auth_on=False, tls_on=False)


def test_prod_encoder_group_is_on_gpus_and_settings_ask_for_them(tmp_path: Path) -> None:
    objects = _render("overlays/prod-gpu")
    settings = _settings(objects, tmp_path)
    cluster = _one(objects, "RayCluster")
    encoder = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "encoder")
    pod = encoder["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert encoder["rayStartParams"]["num-gpus"] == "1"
    assert settings.encoder.device == "cuda" and settings.encoder.num_gpus == 1
    assert encoder["replicas"] >= settings.encoder.replicas


def test_every_container_runs_as_non_root() -> None:
    for target in (*[f"overlays/{o}" for o in OVERLAYS], "load"):
        for obj in _render(target):
            for pod in _pod_specs(obj):
                assert pod["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
                for c in pod["containers"]:
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    if obj["kind"] == "RayCluster":
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        return [g["template"]["spec"] for g in groups]
    if "template" in spec and "spec" in spec["template"]:
        return [spec["template"]["spec"]]
    return []


def test_vendored_schemas_match_the_generator_pins() -> None:
    from scripts import gen_k8s_schemas as gen

    source = (ROOT / "k8s/schemas/SOURCE.md").read_text()
    assert f"k8s.io/kubernetes@v{gen.K8S_VERSION}" in source
    assert f"ray-operator@v{gen.KUBERAY_VERSION}" in source
    folder = ROOT / f"k8s/schemas/kubernetes/v{gen.K8S_VERSION}-standalone-strict"
    for group, version, kind in gen.KINDS:
        schema = json.loads(
            (folder / f"{kind.lower()}{gen.kind_suffix(group, version)}.json").read_text()
        )
        assert schema["properties"]["kind"]["enum"] == [kind]
