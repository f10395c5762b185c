"""GPU exporter: per-GPU metrics from NVML in the nvidia-smi exporter's names, on :9835."""

from observability.gpu_exporter.app import create_app
from observability.gpu_exporter.exposition import render_snapshot
from observability.gpu_exporter.nvml import GpuSample, NvmlApi, NvmlReader, Snapshot
from observability.gpu_exporter.settings import GpuExporterSettings

__all__ = ["GpuExporterSettings", "GpuSample", "NvmlApi", "NvmlReader", "Snapshot", "create_app", "render_snapshot"]
