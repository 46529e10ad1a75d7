"""The Kubernetes manifests against the Kubernetes OpenAPI schemas (offline, strict), and
the autoscaler's metric against what the server exports and the adapter serves."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO_ROOT

from server.metrics import Metrics

K8S = REPO_ROOT / "docker" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests promise to fit


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def schema_errors(document: dict[str, Any]) -> str | None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    found = documents(path)
    assert found
    for document in found:
        assert schema_errors(document) is None, (document["kind"], schema_errors(document))


def test_the_validator_rejects_an_unknown_field() -> None:
    # The check above can fail: a misspelt field in the autoscaler is refused.
    hpa = next(d for d in documents(K8S / "softbon-serve.yaml")
               if d["kind"] == "HorizontalPodAutoscaler")
    broken = copy.deepcopy(hpa)
    broken["spec"]["maxReplica"] = broken["spec"].pop("maxReplicas")
    assert schema_errors(broken) is not None


def test_the_autoscaler_scales_the_deployment_on_an_exported_metric() -> None:
    docs = {d["kind"]: d for d in documents(K8S / "softbon-serve.yaml")}
    hpa, pdb, deployment = (docs["HorizontalPodAutoscaler"], docs["PodDisruptionBudget"],
                            docs["Deployment"])
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exported = Metrics().registry.get_sample_value(metric)
    assert exported is not None, f"the server exports no {metric}"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    adapter = yaml.safe_load(documents(K8S / "prometheus-adapter.yaml")[0]["data"]["config.yaml"])
    served = {rule["name"]["as"] for rule in adapter["rules"]}
    assert metric in served and all(metric in r["seriesQuery"] for r in adapter["rules"])


def test_the_kuberay_service_runs_the_replica_builder_with_valid_settings() -> None:
    import importlib

    from server.replicas import ReplicaSettings

    service = documents(K8S / "kuberay" / "rayservice.yaml")[0]
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    application = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    module, name = application["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    args = dict(application["args"])
    assert args.pop("config") == "/etc/sbon/config.yaml"
    ReplicaSettings.model_validate(args)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    mounted = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert "/etc/sbon" in mounted
