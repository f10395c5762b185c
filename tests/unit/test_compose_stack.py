"""compose.yaml: valid against the compose spec, and shaped the way an operator of a GPU host needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PUBLIC = {"gateway", "grafana"}
WORKERS = ("inference-1", "inference-2")
REQUIRED = re.compile(r"^\$\{[A-Z_]+:\?[^}]+\}$")
DATA = "${APPLIANCE_DATA_PATH:-./data}"


def volume_parts(volume: str) -> list[str]:
    """source, target[, mode] of a short-syntax volume whose source may hold ${VAR:-default}."""
    return re.sub(r"\$\{[^}]*\}", "VAR", volume).split(":")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def test_validates_against_the_compose_spec() -> None:
    check = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [str(check), "--builtin-schema", "vendor.compose-spec", str(REPO / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_whole_stack_is_there(services: dict[str, Any]) -> None:
    assert {
        "gateway",
        "balancer",
        *WORKERS,
        "rag",
        "redis",
        "prometheus",
        "alertmanager",
        "grafana",
        "gpu-exporter",
        "node-exporter",
        "redis-exporter",
    } <= set(services)


def test_workers_reserve_a_gpu_and_mount_models_read_only(services: dict[str, Any]) -> None:
    for name in WORKERS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("device_ids") for d in devices)
        models = [v for v in services[name]["volumes"] if volume_parts(v)[1] == "/data/models"]
        assert models and models[0].endswith(":ro"), name
    gpu_ids = [services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0] for n in WORKERS]
    assert len(set(gpu_ids)) == len(WORKERS), "each worker pins its own GPU by default (env to share one)"


def test_every_service_has_healthcheck_restart_and_rotated_logs(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
        assert service["restart"] in {"unless-stopped", "always"}, name
        logging = service["logging"]
        assert logging["driver"] == "json-file", name
        assert logging["options"]["max-size"] and logging["options"]["max-file"], name


def test_dependencies_wait_for_health(services: dict[str, Any]) -> None:
    assert set(services["gateway"]["depends_on"]) >= {"balancer", "rag", "redis"}
    assert set(services["balancer"]["depends_on"]) >= set(WORKERS)
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in services[dependency]


def test_only_gateway_and_grafana_leave_the_internal_network(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert compose["networks"]["internal"]["internal"] is True
    assert not compose["networks"]["public"].get("internal", False)
    for name, service in services.items():
        networks = set(service["networks"])
        assert "internal" in networks, name
        if name in PUBLIC:
            assert "public" in networks, name
        else:
            assert networks == {"internal"}, f"{name} must stay on the internal network"
            assert "ports" not in service, f"{name} must not publish ports"


def test_no_default_passwords_or_tokens(services: dict[str, Any]) -> None:
    secrets = 0
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                secrets += 1
                assert REQUIRED.match(str(value)), f"{name}: {key} must be required from the env, got {value!r}"
    assert secrets >= 2
    assert REQUIRED.match(services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_redis_appends_to_a_volume_and_data_sits_under_the_configurable_path(services: dict[str, Any]) -> None:
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v == f"{DATA}/redis:/data" for v in services["redis"]["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume.startswith("/:/host:ro"):
                assert name == "node-exporter"
                continue
            assert volume.startswith((f"{DATA}/", "./observability/")), f"{name}: {volume} outside the data path"


def test_services_run_the_python_entry_points_bound_for_containers(services: dict[str, Any]) -> None:
    expected = {
        "gateway": ("gateway", "APPLIANCE_GATEWAY_HOST"),
        "balancer": ("balancer", "APPLIANCE_BALANCER_HOST"),
        "rag": ("rag", "APPLIANCE_RAG_HOST"),
        "inference-1": ("inference", "APPLIANCE_WORKER_HOST"),
        "gpu-exporter": ("observability.gpu_exporter", "APPLIANCE_GPU_EXPORTER_HOST"),
    }
    for name, (module, host_var) in expected.items():
        assert services[name]["command"] == ["python", "-m", module], name
        assert services[name]["environment"][host_var] == "0.0.0.0", name
        dockerfile = REPO / services[name]["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
    # Membership through the Redis registry: each worker advertises the name the balancer resolves.
    assert "APPLIANCE_BALANCER_WORKERS" not in services["balancer"]["environment"]
    redis_url = services["balancer"]["environment"]["APPLIANCE_BALANCER_REDIS_URL"]
    for name in WORKERS:
        assert services[name]["environment"]["APPLIANCE_WORKER_REDIS_URL"] == redis_url
        assert services[name]["environment"]["APPLIANCE_WORKER_ADVERTISE_URL"] == f"http://{name}:8201"
    assert services["gateway"]["environment"]["APPLIANCE_GATEWAY_BALANCER_URL"] == "http://balancer:8100"


def test_env_example_names_every_required_variable() -> None:
    text = (REPO / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = {
        line.split("=")[0]
        for line in (REPO / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert required and required <= example


def test_dockerfiles_build_gpu_images_from_nvidia_bases() -> None:
    inference = (REPO / "docker" / "inference.Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-devel", inference, re.M)
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime", inference, re.M)
    assert "-DGGML_CUDA=on" in inference
    rag = (REPO / "docker" / "rag.Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:", rag, re.M) and "--extra gpu" in rag and "faiss-cpu" in rag
    for path in (REPO / "docker").glob("*.Dockerfile"):
        text = path.read_text()
        assert re.search(r"^USER appliance$", text, re.M), f"{path.name} runs as root"
        for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
            assert (REPO / source).exists() or source in {"inference", "rag"}, f"{path.name}: COPY {source}"


def test_dockerfile_requirements_follow_pyproject() -> None:
    script = str(REPO / "docker" / "requirements.py")
    rag = subprocess.run(
        [sys.executable, script, "--exclude", "faiss-cpu", "llama-cpp-python", "--extra", "gpu"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert any(r.startswith("faiss-gpu") for r in rag) and not any(r.startswith("faiss-cpu") for r in rag)
    assert not any(r.startswith("llama-cpp-python") for r in rag)
    exporter = subprocess.run(
        [sys.executable, script, "--only", "aiohttp", "nvidia-ml-py"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert [r.split(">")[0] for r in exporter] == ["aiohttp", "nvidia-ml-py"]
