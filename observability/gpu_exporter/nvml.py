"""Reading GPUs through NVML (pynvml), behind a small protocol so tests can inject a fake.

A host without an NVIDIA driver is a normal state, not an error: the reader
reports ``nvml_available=False`` and zero GPUs, and retries init now and then
(the driver may load after the exporter starts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

__all__ = ["GpuSample", "NvmlApi", "NvmlReader", "Snapshot", "read_gpu"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class NvmlApi(Protocol):
    """The part of the ``pynvml`` module (nvidia-ml-py) the exporter uses."""

    NVMLError: type[Exception]
    NVML_TEMPERATURE_GPU: int

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str | bytes: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetFanSpeed(self, handle: Any) -> int: ...


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one instant, in the nvidia-smi exporter's units (ratios, bytes, watts, °C)."""

    index: int
    uuid: str
    name: str
    utilization_gpu_ratio: float | None = None
    utilization_memory_ratio: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    memory_free_bytes: float | None = None
    temperature_celsius: float | None = None
    power_draw_watts: float | None = None
    fan_speed_ratio: float | None = None


@dataclass(frozen=True)
class Snapshot:
    nvml_available: bool
    driver_version: str = ""
    gpus: tuple[GpuSample, ...] = ()
    reason: str = ""


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _optional(nvml: NvmlApi, read: Callable[[], T]) -> T | None:
    """A field the GPU does not support (fans on passively cooled cards…) is left out, not an error."""
    try:
        return read()
    except nvml.NVMLError:
        return None


def read_gpu(nvml: NvmlApi, index: int) -> GpuSample:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    rates = _optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    memory = _optional(nvml, lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    temperature = _optional(nvml, lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    power_mw = _optional(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    fan = _optional(nvml, lambda: nvml.nvmlDeviceGetFanSpeed(handle))
    return GpuSample(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        utilization_gpu_ratio=None if rates is None else rates.gpu / 100.0,
        utilization_memory_ratio=None if rates is None else rates.memory / 100.0,
        memory_used_bytes=None if memory is None else float(memory.used),
        memory_total_bytes=None if memory is None else float(memory.total),
        memory_free_bytes=None if memory is None else float(memory.free),
        temperature_celsius=None if temperature is None else float(temperature),
        power_draw_watts=None if power_mw is None else power_mw / 1000.0,
        fan_speed_ratio=None if fan is None else fan / 100.0,
    )


class NvmlReader:
    """Owns the NVML session: init once, retry init after a failure, shut down on close."""

    def __init__(self, nvml: NvmlApi, retry_interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._initialized = False
        self._next_try = 0.0
        self._reason = "not initialised yet"

    def _ensure_init(self) -> bool:
        if self._initialized:
            return True
        now = self._clock()
        if now < self._next_try:
            return False
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            self._next_try = now + self._retry_interval_s
            self._reason = f"NVML unavailable: {exc}"
            log.info("no GPU metrics: %s", self._reason)
            return False
        self._initialized = True
        self._reason = ""
        return True

    def snapshot(self) -> Snapshot:
        """Read every GPU now (blocking: call it from a thread, not the event loop)."""
        with self._lock:
            if not self._ensure_init():
                return Snapshot(nvml_available=False, reason=self._reason)
            try:
                driver = _text(self._nvml.nvmlSystemGetDriverVersion())
                count = self._nvml.nvmlDeviceGetCount()
                gpus = tuple(read_gpu(self._nvml, index) for index in range(count))
            except self._nvml.NVMLError as exc:
                log.warning("NVML read failed: %s", exc)
                return Snapshot(nvml_available=False, reason=f"NVML read failed: {exc}")
            return Snapshot(nvml_available=True, driver_version=driver, gpus=gpus)

    def close(self) -> None:
        with self._lock:
            if self._initialized:
                self._initialized = False
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError as exc:
                    log.warning("NVML shutdown failed: %s", exc)
