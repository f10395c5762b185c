"""deploy/kubernetes: every manifest validates (offline schemas), and the cluster shape is right."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

BASE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"


def kustomization() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return document


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name in kustomization()["resources"]:
        out += [(name, doc) for doc in yaml.safe_load_all((BASE / name).read_text()) if doc]
    return out


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == kind}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]  # type: ignore[no-any-return]


def test_kustomization_lists_every_manifest_in_the_folder() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert kustomization()["namespace"] == "llm-appliance"


@pytest.mark.parametrize(
    ("source", "document"), documents(), ids=[f"{s}:{d['kind']}/{d['metadata']['name']}" for s, d in documents()]
)
def test_manifest_validates_strictly(source: str, document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    broken = yaml.safe_load((BASE / "gateway.yaml").read_text().split("---")[0])
    broken["spec"]["selectr"] = broken["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_inference_requests_a_gpu_behind_a_headless_service() -> None:
    worker = by_kind("StatefulSet")["inference"]
    resources = containers(worker)[0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    service = by_kind("Service")[worker["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    config = by_kind("ConfigMap")["appliance-config"]["data"]
    assert config["APPLIANCE_WORKER_REDIS_URL"] == config["APPLIANCE_BALANCER_REDIS_URL"]
    env = {e["name"]: e for e in containers(worker)[0]["env"]}  # registers at its pod IP (downward API)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["APPLIANCE_WORKER_ADVERTISE_URL"]["value"] == "http://$(POD_IP):8201"
    assert list(env).index("POD_IP") < list(env).index("APPLIANCE_WORKER_ADVERTISE_URL")  # $(…) sees earlier vars


def test_gateway_scales_with_an_hpa() -> None:
    hpa = by_kind("HorizontalPodAutoscaler")["gateway"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gateway")
    assert "gateway" in by_kind("Deployment")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_rag_keeps_its_index_on_a_persistent_volume() -> None:
    rag = by_kind("Deployment")["rag"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in rag["spec"]["template"]["spec"]["volumes"]}
    assert claims and claims <= set(by_kind("PersistentVolumeClaim"))
    assert rag["spec"]["replicas"] == 1 and rag["spec"]["strategy"]["type"] == "Recreate"


def test_redis_keeps_aof_on_a_claim() -> None:
    redis = by_kind("StatefulSet")["redis"]
    assert "--appendonly" in containers(redis)[0]["args"]
    assert redis["spec"]["volumeClaimTemplates"]


def test_workloads_are_scraped_and_selectors_match() -> None:
    services = by_kind("Service")
    for kind in ("Deployment", "StatefulSet", "DaemonSet"):
        for name, workload in by_kind(kind).items():
            template = workload["spec"]["template"]
            labels = template["metadata"]["labels"]
            assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
            annotations = template["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true", name
            ports = {p["containerPort"] for c in containers(workload) for p in c.get("ports", [])}
            assert int(annotations["prometheus.io/port"]) in ports, name
            if name in services:
                wanted = {p["targetPort"] for p in services[name]["spec"]["ports"]}
                assert wanted <= ports, name


def test_the_internal_token_comes_from_a_secret_never_inline() -> None:
    for _, doc in documents():
        if doc["kind"] in {"Deployment", "StatefulSet"} and doc["metadata"]["name"] != "redis":
            env = {e["name"]: e for c in containers(doc) for e in c.get("env", [])}
            token = env["APPLIANCE_INTERNAL_TOKEN"]
            assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"] == "appliance-secrets"
    assert "Secret" not in {doc["kind"] for _, doc in documents()}


def test_each_service_logs_in_to_redis_as_its_own_user_from_a_mounted_secret() -> None:
    config = by_kind("ConfigMap")["appliance-config"]["data"]
    assert all("@" not in v for k, v in config.items() if k.endswith("_REDIS_URL")), "no password in a URL"
    users = {"gateway": ("GATEWAY", "gateway"), "balancer": ("BALANCER", "balancer"), "inference": ("WORKER", "worker")}
    workloads = {**by_kind("Deployment"), **by_kind("StatefulSet")}
    for name, (prefix, user) in users.items():
        spec = workloads[name]["spec"]["template"]["spec"]
        (container,) = [c for c in spec["containers"] if c["name"] == name]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env[f"APPLIANCE_{prefix}_REDIS_PASSWORD_FILE"] == mounted["redis-auth"] + "/password", name
        (volume,) = [v for v in spec["volumes"] if v["name"] == "redis-auth"]
        assert volume["secret"]["secretName"] == "appliance-redis"
        assert volume["secret"]["items"] == [{"key": user, "path": "password"}], "only its own user's password"
        assert volume["secret"]["defaultMode"] == 0o440 and spec["securityContext"]["fsGroup"] == 10001


def test_redis_loads_the_acl_file_and_never_evicts() -> None:
    redis = by_kind("StatefulSet")["redis"]
    server, exporter = containers(redis)
    args = server["args"]
    assert args[args.index("--aclfile") + 1].startswith("/etc/redis-auth/")
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction" and "--maxmemory" in args
    assert "--user admin" in " ".join(server["readinessProbe"]["exec"]["command"])
    env = {e["name"]: e for e in exporter["env"]}
    assert env["REDIS_USER"]["value"] == "exporter"
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "appliance-redis", "key": "exporter"}
