"""The compose runtime's logic without an engine: clear errors, file selection, scale limits, and the
offline bundle's verification (tampered, extra or escaping members are refused). The real engine is
driven in tests/e2e/test_compose_stack.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from appliance.runtime.compose import ComposeRuntime, worker_index
from appliance.runtime.compose.bundle import load_bundle
from appliance.runtime.compose.engine import EngineError, explain, find_engine
from appliance.runtime.settings import RuntimeSettings
from tests.support.compose_engine import FakeEngine, make_bundle, rewrite_bundle
from tests.support.processes import REPO


def runtime(tmp_path: Path, **settings: Any) -> ComposeRuntime:
    values = {
        "data_dir": tmp_path / "data",
        "compose_file": REPO / "compose.yaml",
        "internal_token": "t" * 32,
        **settings,
    }
    return ComposeRuntime(RuntimeSettings(**values), engine=FakeEngine())


def test_engine_failures_read_as_one_sentence() -> None:
    taken = (
        "Error response from daemon: driver failed programming external connectivity on endpoint x: "
        "Bind for 127.0.0.1:8000 failed: port is already allocated"
    )
    assert "127.0.0.1:8000" in (explain(taken) or "") and "already taken" in (explain(taken) or "")
    assert "not running" in (explain("Cannot connect to the Docker daemon at unix:///var/run/docker.sock.") or "")
    assert "docker` group" in (explain("permission denied while trying to connect to ... docker.sock") or "")
    assert explain("something else entirely") is None


def test_no_docker_on_the_path_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineError, match="Docker is not installed"):
        find_engine()


def test_the_cli_says_so_instead_of_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "APPLIANCE_DATA_DIR": str(tmp_path / "data"), "NO_COLOR": "1"}
    for verb in (["up"], ["status"], ["down"], ["logs", "gateway"], ["scale", "inference=1"]):
        result = subprocess.run(
            [sys.executable, "-m", "appliance.cli", *verb, "--runtime", "compose"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
            check=False,
        )
        assert result.returncode != 0, verb
        assert "Traceback" not in result.stderr, result.stderr
        assert "Docker is not installed" in result.stderr + result.stdout, (verb, result.stderr)


def test_compose_files_default_to_the_cpu_profile_and_follow_compose_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COMPOSE_FILE", raising=False)
    rt = runtime(tmp_path)
    assert rt.files() == [REPO / "compose.yaml"] and rt.cpu_profile
    monkeypatch.setenv("COMPOSE_FILE", f"compose.yaml{os.pathsep}compose.gpu.yaml")
    assert rt.files() == [REPO / "compose.yaml", REPO / "compose.gpu.yaml"] and not rt.cpu_profile


def test_workers_are_the_inference_services_and_scale_stays_within_them(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    assert [worker_index(s) for s in ("inference-1", "inference-12", "inference", "rag")] == [1, 12, None, None]
    assert rt.workers() == ["inference-1", "inference-2"]
    with pytest.raises(EngineError, match="inference-K"):
        rt.scale(3)
    with pytest.raises(EngineError, match="unknown service 'nope'"):
        rt.restart("nope")


def test_a_taken_port_is_named_before_compose_tries(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        rt = runtime(tmp_path, gateway_port=port)
        with pytest.raises(EngineError, match=f"port {port} on 127.0.0.1 is already taken"):
            rt.check_ports()


def test_the_environment_carries_data_path_ports_and_a_generated_token(tmp_path: Path) -> None:
    rt = runtime(tmp_path, gateway_port=18000, prometheus_port=19090, internal_token="")
    env = rt.env()
    assert env["APPLIANCE_DATA_PATH"] == str((tmp_path / "data").resolve())
    assert env["APPLIANCE_GATEWAY_PUBLISH"] == "18000" and env["APPLIANCE_PROMETHEUS_PUBLISH"] == "19090"
    assert env["APPLIANCE_INTERNAL_TOKEN"] == (tmp_path / "data" / "run" / "internal_token").read_text().strip()
    rt.prepare_data()
    assert {p.name for p in (tmp_path / "data").iterdir()} >= {"models", "redis", "rag", "gateway", "prometheus"}


def test_a_bundle_round_trip_loads_images_models_and_compose_files(tmp_path: Path) -> None:
    _, archive = make_bundle(tmp_path)
    fresh = FakeEngine()
    summary = load_bundle(fresh, archive, tmp_path / "site", tmp_path / "site" / "data" / "models", lambda _m: None)
    assert summary["images"] == ["app/one:1", "app/two:1"] and summary["models"] == ["mine.gguf"]
    assert (tmp_path / "site" / "compose.yaml").read_bytes() == (REPO / "compose.yaml").read_bytes()
    assert (tmp_path / "site" / "observability" / "prometheus.cpu.yml").is_file()
    assert (tmp_path / "site" / "data" / "models" / "mine.gguf").read_bytes() == (
        tmp_path / "models" / "mine.gguf"
    ).read_bytes()
    assert any(call[0] == "load" for call in fresh.calls)  # type: ignore[attr-defined]


@pytest.mark.parametrize("tamper", ["flip-a-byte", "extra-member", "escaping-member", "missing-member"])
def test_a_tampered_bundle_is_refused_before_anything_loads(tmp_path: Path, tamper: str) -> None:
    _, archive = make_bundle(tmp_path)

    def change(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name == "models/mine.gguf":
            if tamper == "flip-a-byte":
                return [(name, data[:-1] + bytes([data[-1] ^ 1]))]
            if tamper == "missing-member":
                return []
        if name == "manifest.json" and tamper == "extra-member":
            return [(name, data), ("compose/extra.sh", b"#!/bin/sh\n")]
        if name == "manifest.json" and tamper == "escaping-member":
            return [(name, data), ("../escape.txt", b"x")]
        return [(name, data)]

    changed = rewrite_bundle(archive, change)
    fresh = FakeEngine()
    with pytest.raises(EngineError, match="refusing the bundle"):
        load_bundle(fresh, changed, tmp_path / "site", tmp_path / "site" / "models", lambda _m: None)
    assert not any(call[0] == "load" for call in fresh.calls)  # type: ignore[attr-defined]
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "site" / "compose.yaml").exists()


def test_the_bundle_manifest_lists_images_by_id(tmp_path: Path) -> None:
    _, archive = make_bundle(tmp_path)
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest["images"] == [{"name": "app/one:1", "id": "sha256:one"}, {"name": "app/two:1", "id": "sha256:two"}]
    assert set(manifest["files"]) >= {"images.tar", "models/mine.gguf", "compose/compose.yaml", "compose/.env.example"}
