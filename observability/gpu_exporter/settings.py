"""The GPU exporter's one typed settings object."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from appliance.core.settings import CommonSettings

__all__ = ["GpuExporterSettings"]


class GpuExporterSettings(CommonSettings):
    """``APPLIANCE_GPU_EXPORTER_<FIELD>`` or ``[gpu_exporter]`` in appliance.toml."""

    model_config = SettingsConfigDict(env_prefix="APPLIANCE_GPU_EXPORTER_", frozen=True, extra="ignore")
    toml_section: ClassVar[str] = "gpu_exporter"

    host: str = "127.0.0.1"
    port: int = Field(default=9835, ge=1, le=65535)
    nvml_retry_s: float = Field(
        default=60.0, gt=0, description="How often a scrape retries NVML init after it failed (driver not loaded yet)."
    )
