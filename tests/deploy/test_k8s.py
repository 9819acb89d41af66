"""deploy/k8s: rendered with kustomize (kubectl's), validated against the Kubernetes schemas.

Built-in kinds go through `kubernetes-validate --strict` (unknown fields are errors). The
Prometheus Operator kinds (ServiceMonitor, PrometheusRule) are not in those schemas; they are
validated with cloudcoil's models generated from the operator's v0.80 CRDs, strictly: a field the
schema does not know is dropped by the model, so the dumped model must equal the input.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import promql
from tests.deploy.conftest import ROOT, run, tool

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSIONS = ["1.35.0", "1.37.0"]
BUILTIN = {"Namespace", "Service", "PersistentVolumeClaim", "Deployment"}
BUILTIN |= {"HorizontalPodAutoscaler", "ConfigMap"}
CUSTOM = {"ServiceMonitor", "PrometheusRule"}


@functools.cache
def render(directory: Path) -> str:
    result = run([tool("kubectl"), "kustomize", str(directory)])
    assert result.returncode == 0, result.stderr
    return result.stdout


def documents(directory: Path = K8S) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render(directory)) if d]


def one(kind: str, directory: Path = K8S) -> dict[str, Any]:
    (found,) = [d for d in documents(directory) if d["kind"] == kind]
    return found


def test_kustomize_renders_every_resource() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == sorted(BUILTIN - {"ConfigMap"} | CUSTOM)
    for doc in documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "longhaul", doc["kind"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "longhaul"
    adapter = documents(K8S / "prometheus-adapter")
    assert [(d["kind"], d["metadata"]["namespace"]) for d in adapter] == [
        ("ConfigMap", "monitoring")
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_validate_strictly(version: str, tmp_path: Path) -> None:
    builtin = [
        d
        for directory in (K8S, K8S / "prometheus-adapter")
        for d in documents(directory)
        if d["kind"] in BUILTIN
    ]
    assert {d["kind"] for d in builtin} == BUILTIN
    manifest = tmp_path / "builtin.yaml"
    manifest.write_text(yaml.safe_dump_all(builtin))
    cmd = [tool("kubernetes-validate"), "--strict", "-k", version, str(manifest)]
    result = run(cmd)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert out.count("passed for resource") == len(builtin), out
    assert "WARN" not in out and "ERROR" not in out, out


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    result = run([tool("kubernetes-validate"), "--strict", "-k", "1.37.0", str(manifest)])
    assert result.returncode == 1
    assert "'readynessProbe' was unexpected" in result.stdout + result.stderr


def validate_custom(doc: dict[str, Any]) -> dict[str, Any]:
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, doc["kind"]).model_validate(doc)
    dumped: dict[str, Any] = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    return dumped


@pytest.mark.parametrize("kind", sorted(CUSTOM))
def test_operator_kinds_validate_against_the_crd_schema(kind: str) -> None:
    doc = one(kind)
    assert validate_custom(doc) == doc, "a field unknown to the CRD schema was dropped"


def test_crd_validation_catches_mistakes() -> None:
    from pydantic import ValidationError

    monitor = one("ServiceMonitor")
    monitor["spec"]["endpoints"][0]["honourLabels"] = True  # misspelt: silently ignored by k8s
    assert validate_custom(monitor) != monitor
    monitor = one("ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = 15  # must be a duration string
    with pytest.raises(ValidationError):
        validate_custom(monitor)


# ------------------------------------------------------------------------------ semantics


def api_container() -> dict[str, Any]:
    spec = one("Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "api"]
    return container


def test_deployment_requests_a_gpu_and_probes_the_health_routes() -> None:
    container = api_container()
    for key in ("requests", "limits"):
        assert container["resources"][key]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["image"] == "longhaul:gpu"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LONGHAUL_STORE"] == "/models" and env["LONGHAUL_HOST"] == "0.0.0.0"


def test_model_store_volume_is_seeded_then_mounted_read_only() -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    claim = one("PersistentVolumeClaim")
    (volume,) = spec["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (mount,) = api_container()["volumeMounts"]
    assert mount == {"name": volume["name"], "mountPath": "/models", "readOnly": True}
    (seed,) = spec["initContainers"]
    assert seed["command"] == ["longhaul-seed-store", "/models", "/store"]
    assert seed["volumeMounts"] == [{"name": volume["name"], "mountPath": "/store"}]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "deploy/docker/seed-store.sh /usr/local/bin/longhaul-seed-store" in dockerfile


def test_pods_run_as_the_image_user() -> None:
    security = one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == 10001
    assert "USER 10001:10001" in (ROOT / "Dockerfile").read_text()


def test_service_and_monitor_select_the_pods() -> None:
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one("Service")
    assert service["metadata"]["name"] == "longhaul", "job label the alerts select"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    monitor = one("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True, "keeps Longhaul's own `endpoint` label"


def test_hpa_scales_the_deployment_on_the_adapter_metric() -> None:
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "longhaul",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    (rule,) = promql.adapter_rules()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_adapter_configmap_carries_the_rule_file() -> None:
    configmap = one("ConfigMap", K8S / "prometheus-adapter")
    shipped = yaml.safe_load(configmap["data"]["config.yaml"])
    assert shipped["rules"] == promql.adapter_rules()
