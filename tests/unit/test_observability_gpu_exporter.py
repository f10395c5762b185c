"""GPU exporter: the NVML → nvidia-smi-names mapping, and the no-GPU path.

There is no GPU on this machine, so the mapping tests pass a *fake* NVML (an
object with pynvml's function names) — a fake only because real GPU readings
cannot be had here. The no-GPU tests use the real ``pynvml`` module, whose
``nvmlInit`` really fails here because no NVIDIA driver is installed. The real
GPU path is checked on a lent GPU machine (GPU issue).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from observability.gpu_exporter import GpuExporterSettings, NvmlReader, create_app, render_snapshot


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """Stands in for pynvml with two GPUs; the second has no fan (NOT_SUPPORTED, like datacenter cards)."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail_init: int = 0) -> None:
        self.fail_init = fail_init
        self.init_calls = 0
        self.shutdowns = 0
        self.gpus = [
            {"uuid": "GPU-aaaa", "name": b"NVIDIA H100 80GB HBM3", "util": (37, 12),
             "mem": (80 * 2**30, 60 * 2**30, 20 * 2**30), "temp": 61, "power_mw": 312_500, "fan": 45},
            {"uuid": "GPU-bbbb", "name": "NVIDIA L40S", "util": (0, 0),
             "mem": (48 * 2**30, 47 * 2**30, 1 * 2**30), "temp": 88, "power_mw": 75_000, "fan": None},
        ]

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_calls <= self.fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str:
        return str(handle["uuid"])

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str | bytes:
        return handle["name"]  # type: ignore[no-any-return]

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> SimpleNamespace:
        gpu, memory = handle["util"]
        return SimpleNamespace(gpu=gpu, memory=memory)

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> SimpleNamespace:
        total, used, free = handle["mem"]
        return SimpleNamespace(total=total, used=used, free=free)

    def nvmlDeviceGetTemperature(self, handle: dict[str, Any], sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return int(handle["temp"])

    def nvmlDeviceGetPowerUsage(self, handle: dict[str, Any]) -> int:
        return int(handle["power_mw"])

    def nvmlDeviceGetFanSpeed(self, handle: dict[str, Any]) -> int:
        if handle["fan"] is None:
            raise FakeNVMLError("Not Supported")
        return int(handle["fan"])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def families(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


def test_fake_gpus_map_to_nvidia_smi_names_and_units() -> None:
    reader = NvmlReader(FakeNvml(), retry_interval_s=60)
    got = samples(render_snapshot(reader.snapshot()).decode())
    a, b = (("uuid", "GPU-aaaa"),), (("uuid", "GPU-bbbb"),)
    assert got[("appliance_gpu_count", ())] == 2
    assert got[("appliance_gpu_exporter_up", ())] == 1
    assert got[("appliance_gpu_nvml_available", (("reason", ""),))] == 1
    assert got[("nvidia_smi_utilization_gpu_ratio", a)] == pytest.approx(0.37)
    assert got[("nvidia_smi_utilization_memory_ratio", a)] == pytest.approx(0.12)
    assert got[("nvidia_smi_memory_total_bytes", a)] == 80 * 2**30
    assert got[("nvidia_smi_memory_used_bytes", a)] == 60 * 2**30
    assert got[("nvidia_smi_memory_free_bytes", a)] == 20 * 2**30
    assert got[("nvidia_smi_temperature_gpu", b)] == 88
    assert got[("nvidia_smi_power_draw_watts", a)] == pytest.approx(312.5)
    assert got[("nvidia_smi_fan_speed_ratio", a)] == pytest.approx(0.45)
    assert ("nvidia_smi_fan_speed_ratio", b) not in got  # unsupported field is left out, not an error
    info = (("driver_version", "550.54.15"), ("index", "0"), ("name", "NVIDIA H100 80GB HBM3"), ("uuid", "GPU-aaaa"))
    assert got[("nvidia_smi_gpu_info", info)] == 1


def test_no_gpu_declares_every_family_without_samples() -> None:
    reader = NvmlReader(FakeNvml(fail_init=1), retry_interval_s=60)
    text = render_snapshot(reader.snapshot()).decode()
    got = samples(text)
    assert got[("appliance_gpu_exporter_up", ())] == 1
    assert got[("appliance_gpu_count", ())] == 0
    assert got[("appliance_gpu_nvml_available", (("reason", "NVML unavailable: Driver Not Loaded"),))] == 0
    assert not [name for name, _ in got if name.startswith("nvidia_smi_")]
    assert {"nvidia_smi_memory_used_bytes", "nvidia_smi_temperature_gpu", "nvidia_smi_gpu_info"} <= families(text)


def test_init_is_retried_only_after_the_interval() -> None:
    now = [0.0]
    nvml = FakeNvml(fail_init=1)
    reader = NvmlReader(nvml, retry_interval_s=30, clock=lambda: now[0])
    assert not reader.snapshot().nvml_available
    now[0] = 10.0
    assert not reader.snapshot().nvml_available
    assert nvml.init_calls == 1  # no NVML hammering on every scrape
    now[0] = 31.0
    snapshot = reader.snapshot()
    assert snapshot.nvml_available and len(snapshot.gpus) == 2
    reader.close()
    reader.close()
    assert nvml.shutdowns == 1


def _gpus_on_this_host() -> int | None:
    """What NVML itself says, asked directly: the GPU count, or None where NVML is unavailable."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


async def test_real_pynvml_serves_what_this_host_has() -> None:
    """On a CPU-only host the no-GPU gauges; on a GPU host (the product's target) one series per GPU."""
    gpus = _gpus_on_this_host()
    app = create_app(GpuExporterSettings(internal_token="x" * 32), pynvml)
    async with TestClient(TestServer(app)) as client:
        metrics = await client.get("/metrics")
        assert metrics.status == 200
        assert metrics.headers["Content-Type"].startswith("text/plain")
        got = samples(await metrics.text())
        health = await client.get("/health")
        body = await health.json()
    assert got[("appliance_gpu_exporter_up", ())] == 1
    assert got[("appliance_gpu_count", ())] == (gpus or 0)
    available = [value for (name, _), value in got.items() if name == "appliance_gpu_nvml_available"]
    assert available == [0 if gpus is None else 1]
    assert health.status == 200
    assert body["status"] == "ok" and body["nvml_available"] is (gpus is not None) and body["gpu_count"] == (gpus or 0)
    assert len([key for key in got if key[0] == "nvidia_smi_gpu_info"]) == (gpus or 0)  # one identity per GPU


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_GPU_EXPORTER_PORT", "19835")
    monkeypatch.setenv("APPLIANCE_GPU_EXPORTER_HOST", "0.0.0.0")
    settings = GpuExporterSettings()
    assert (settings.host, settings.port) == ("0.0.0.0", 19835)
    assert GpuExporterSettings.model_fields["port"].default == 9835
