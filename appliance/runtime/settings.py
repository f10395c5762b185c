"""Settings of the local runtime: which services run, on which ports, with which model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from appliance.core.settings import CommonSettings

__all__ = ["RuntimeSettings"]


class RuntimeSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_RUNTIME_")
    toml_section = "runtime"

    runtime: Literal["local", "compose"] = "local"
    workers: int = Field(default=2, ge=1, le=64)
    model_path: Path | None = None
    model_alias: str = "gemma-3-270m"
    worker_slots: int = Field(default=8, ge=1, le=256)
    worker_threads: int | None = Field(default=None, ge=1)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8000, ge=1, le=65535)
    balancer_port: int = Field(default=8100, ge=1, le=65535)
    worker_base_port: int = Field(default=8201, ge=1, le=65535)
    rag_port: int = Field(default=8300, ge=1, le=65535)
    redis_port: int = Field(default=6379, ge=1, le=65535)
    prometheus_port: int = Field(default=9090, ge=1, le=65535)
    exporter_port: int = Field(default=9835, ge=1, le=65535)
    with_rag: bool = True
    with_prometheus: bool = True
    tls: bool = False
    ready_timeout_s: float = Field(default=180.0, gt=0)
    compose_file: Path = Path("compose.yaml")
    # Managed backups (a supervisord program running `appliance backup --every`), e.g. "6h".
    backup_every: str | None = Field(default=None, pattern=r"^[1-9][0-9]*[smhd]$")
    backup_keep: int = Field(default=7, ge=1)
    backup_offsite: Path | None = None

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def worker_port(self, index: int) -> int:
        """Port of worker number ``index`` (1-based)."""
        return self.worker_base_port + index - 1
