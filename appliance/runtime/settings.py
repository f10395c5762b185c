"""Settings of the local runtime: which services run, on which ports, on which address.

The model is a worker setting (``[worker] model_path``, ``model_alias``, ``slots`` in appliance.toml,
or ``APPLIANCE_WORKER_*``): the runtime reads it through :class:`WorkerModelView` and passes exactly
that to every worker. ``appliance up --model/--served-name/--slots`` override it; those flags, like
``--tls``, ``--host`` and the worker count, are remembered (``data/run/stack.json``) by every later verb.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from appliance.core.model_files import DEFAULT_MODEL_ALIAS
from appliance.core.redis_auth import login_kwargs, password_file
from appliance.core.settings import CommonSettings

__all__ = ["LOOPBACK_HOSTS", "RuntimeSettings", "WorkerModelView"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})  # noqa: S104 - names, not a bind


def _names(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class RuntimeSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_RUNTIME_")
    toml_section: ClassVar[str] = "runtime"

    runtime: Literal["local", "compose"] = "local"
    workers: int = Field(default=2, ge=1, le=64)
    # Overrides of the worker's own [worker] settings (`up --model/--served-name/--slots`); None = the file's.
    model_path: Path | None = None
    model_alias: str | None = Field(default=None, min_length=1, pattern=r"^[^\"\n]+$")
    worker_slots: int | None = Field(default=None, ge=1, le=256)
    worker_threads: int | None = Field(default=None, ge=1)
    # The one address the gateway listens on: 127.0.0.1 (this machine only), a LAN address, or 0.0.0.0.
    # Every other service listens on 127.0.0.1 whatever this says.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8000, ge=1, le=65535)
    balancer_port: int = Field(default=8100, ge=1, le=65535)
    worker_base_port: int = Field(default=8201, ge=1, le=65535)
    rag_port: int = Field(default=8300, ge=1, le=65535)
    redis_port: int = Field(default=6379, ge=1, le=65535)
    redis_maxmemory: str = Field(
        default="1gb", pattern=r"^[1-9][0-9]*(b|kb|mb|gb)?$",
        description="Redis memory cap (noeviction: past it writes fail, nothing is evicted); above the "
        "gateway's cache_max_bytes",
    )
    prometheus_port: int = Field(default=9090, ge=1, le=65535)
    exporter_port: int = Field(default=9835, ge=1, le=65535)
    with_rag: bool = True
    with_prometheus: bool = True
    tls: bool = False
    tls_cert: Path | None = None  # the admin's own certificate (PEM chain) and key; implies tls
    tls_key: Path | None = None
    tls_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="extra DNS names / IPs for the self-signed certificate"
    )
    # How long a stopping gateway or balancer lets in-flight requests (long streams) finish; sized for
    # long generations.
    drain_s: int = Field(default=300, ge=1, le=3600)
    ready_timeout_s: float = Field(default=180.0, gt=0)
    compose_file: Path = Path("compose.yaml")
    # Managed backups (a supervisord program running `appliance backup --every`), e.g. "6h".
    backup_every: str | None = Field(default=None, pattern=r"^[1-9][0-9]*[smhd]$")
    backup_keep: int = Field(default=7, ge=1)
    backup_offsite: Path | None = None

    @field_validator("tls_names", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        return _names(value)

    @model_validator(mode="before")
    @classmethod
    def _own_cert_means_tls(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("tls_cert") or data.get("tls_key")):
            return {**data, "tls": True}
        return data

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def gateway_local_url(self) -> str:
        """How this machine reaches the gateway (loopback unless it listens on one specific address)."""
        host = self.gateway_host
        if host in WILDCARD_HOSTS or host in LOOPBACK_HOSTS:
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.gateway_port}"

    def redis_admin_login(self) -> dict[str, Any]:
        """Keyword arguments logging a redis-py client in as the ``admin`` ACL user (CLI status, backup);
        none before the runtime first created the Redis users."""
        path = password_file(self.data_dir, "admin")
        return login_kwargs("admin", path) if path.is_file() else {}

    def worker_port(self, index: int) -> int:
        """Port of worker number ``index`` (1-based)."""
        return self.worker_base_port + index - 1


class WorkerModelView(CommonSettings):
    """What the workers will serve, read from the same sources the worker reads (``[worker]``,
    ``APPLIANCE_WORKER_*``) without validating the rest of the worker's settings."""

    model_config = SettingsConfigDict(env_prefix="APPLIANCE_WORKER_")
    toml_section: ClassVar[str] = "worker"

    model_path: str = ""
    model_alias: str = DEFAULT_MODEL_ALIAS
    slots: int | None = None
    n_ctx: int | None = None
