"""Turn a :class:`Snapshot` into Prometheus text, in the nvidia-smi exporter's metric names.

Every family is declared even with no GPU (HELP/TYPE lines, no samples), so
dashboards and alert rules find the names and simply show no data.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.core.metrics import new_registry, render
from observability.gpu_exporter.nvml import GpuSample, Snapshot

__all__ = ["PER_GPU_GAUGES", "SnapshotCollector", "render_snapshot"]

# metric name → (GpuSample field, help text)
PER_GPU_GAUGES: dict[str, tuple[str, str]] = {
    "nvidia_smi_utilization_gpu_ratio": ("utilization_gpu_ratio", "GPU utilisation (0-1)."),
    "nvidia_smi_utilization_memory_ratio": ("utilization_memory_ratio", "Memory controller utilisation (0-1)."),
    "nvidia_smi_memory_used_bytes": ("memory_used_bytes", "GPU memory in use, bytes."),
    "nvidia_smi_memory_total_bytes": ("memory_total_bytes", "GPU memory in total, bytes."),
    "nvidia_smi_memory_free_bytes": ("memory_free_bytes", "GPU memory free, bytes."),
    "nvidia_smi_temperature_gpu": ("temperature_celsius", "GPU core temperature, degrees Celsius."),
    "nvidia_smi_power_draw_watts": ("power_draw_watts", "GPU power draw, watts."),
    "nvidia_smi_fan_speed_ratio": ("fan_speed_ratio", "Fan speed (0-1 of maximum)."),
}


def _per_gpu(name: str, field: str, doc: str, gpus: tuple[GpuSample, ...]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["uuid"])
    for gpu in gpus:
        value = getattr(gpu, field)
        if value is not None:
            family.add_metric([gpu.uuid], float(value))
    return family


class SnapshotCollector(Collector):
    """Exposes one snapshot; a fresh registry is built per scrape, so nothing is global."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot
        yield GaugeMetricFamily("appliance_gpu_exporter_up", "1 while the GPU exporter answers.", value=1.0)
        yield GaugeMetricFamily("appliance_gpu_count", "GPUs NVML reports (0 without GPU/driver).",
                                value=float(len(snap.gpus)))
        available = GaugeMetricFamily(
            "appliance_gpu_nvml_available",
            "1 if NVML answered; 0 means no NVIDIA driver/GPU on this host (normal on CPU-only hosts).",
            labels=["reason"],
        )
        available.add_metric([snap.reason], 1.0 if snap.nvml_available else 0.0)
        yield available
        info = GaugeMetricFamily("nvidia_smi_gpu_info", "GPU identity (value is always 1).",
                                 labels=["uuid", "name", "index", "driver_version"])
        for gpu in snap.gpus:
            info.add_metric([gpu.uuid, gpu.name, str(gpu.index), snap.driver_version], 1.0)
        yield info
        for name, (field, doc) in PER_GPU_GAUGES.items():
            yield _per_gpu(name, field, doc, snap.gpus)


def render_snapshot(snapshot: Snapshot) -> bytes:
    registry = new_registry()
    registry.register(SnapshotCollector(snapshot))
    return render(registry)
