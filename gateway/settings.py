"""The gateway's one typed settings object (env ``APPLIANCE_GATEWAY_*``, toml ``[gateway]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from appliance.core.audit import audit_path as default_audit_path
from appliance.core.redis_settings import RedisClientSettings
from appliance.core.settings import load_settings
from gateway.auth.settings import AuthSettings

__all__ = ["GatewaySettings"]


class GatewaySettings(RedisClientSettings):
    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_GATEWAY_", frozen=True, extra="ignore", populate_by_name=True
    )
    toml_section: ClassVar[str] = "gateway"

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    balancer_url: str = "http://127.0.0.1:8100"
    rag_url: str = "http://127.0.0.1:8300"
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    redis_username: str = Field(default="gateway", description="Redis ACL user this service logs in as")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_self_signed: bool = False
    tls_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="names/IPs the self-signed certificate covers (comma-separated in env)"
    )
    shutdown_drain_s: int = Field(
        default=300, ge=1, description="on SIGTERM, in-flight requests (long streams) get this long to finish"
    )

    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="413 past this, before reading it all")
    max_upload_bytes: int = Field(default=64 << 20, ge=1024, description="limit for /v1/collections uploads")
    max_messages: int = Field(default=256, ge=1)

    cache_enabled: bool = True
    cache_ttl_s: int = Field(default=3600, ge=1)
    cache_max_ttl_s: int = Field(
        default=86400, ge=1, description="a client's X-Cache-TTL above this is lowered to it"
    )
    cache_max_entry_bytes: int = Field(default=1 << 20, ge=1024)
    cache_max_bytes: int = Field(
        default=64 << 20, ge=1 << 16,
        description="the response cache's own cap in Redis (oldest entries go first); keep it well under "
        "Redis maxmemory, which never evicts keys or usage",
    )

    rate_limit_fail_open: bool = Field(
        default=True, description="Redis down: admit (true) or refuse with 503 (false) rate-limited requests"
    )
    key_cache_ttl_s: float = Field(default=60.0, ge=0, description="how long verified keys work while Redis is down")
    concurrency_ttl_s: int = Field(default=900, ge=10, description="a lost concurrency slot frees itself after this")
    redis_timeout_s: float = Field(default=2.0, gt=0, description="a Redis that does not answer in this long is down")

    default_rpm: int = Field(default=600, ge=0, description="per-key requests/min for new keys; 0 = unlimited")
    default_tpm: int = Field(default=0, ge=0)
    default_tpd: int = Field(default=0, ge=0)
    default_max_concurrent: int = Field(default=0, ge=0)

    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=300.0, gt=0)
    upstream_pool_size: int = Field(default=256, ge=1)
    upstream_keepalive_s: float = Field(
        default=30.0, gt=0, lt=75,
        description="a kept-alive connection to the balancer or the RAG service is reused this long at most "
                    "(under their servers' 75 s idle timeout)")
    model_info_ttl_s: float = Field(default=10.0, ge=0)

    log_prompts: bool = False
    rag_max_context_chars: int = Field(default=12000, ge=256)
    rag_max_bytes_per_key: int = Field(
        default=1 << 30, ge=0, description="documents one non-admin key may store in its collections; 0 = no cap"
    )

    responses_dir: Path | None = Field(
        default=None, description="where stored responses live (SQLite); default: data_dir/responses"
    )
    responses_retention_days: float = Field(
        default=30.0, gt=0, description="stored responses older than this are no longer served and are deleted"
    )
    responses_prune_every_s: float = Field(default=3600.0, gt=0, description="how often old responses are deleted")

    files_dir: Path | None = Field(default=None, description="the Files API and batch runs; default: data_dir/files")
    files_max_bytes: int = Field(default=100 << 20, ge=1024, description="the largest file one upload may be")
    files_max_bytes_per_key: int = Field(default=1 << 30, ge=0, description="files one key may hold; 0 = no cap")
    batch_max_lines: int = Field(default=50_000, ge=1, description="requests one batch may hold")
    batch_concurrency: int = Field(default=8, ge=1, description="batch lines one gateway has in flight at once")
    batch_max_running: int = Field(default=4, ge=1, description="batches one gateway runs at once")
    batch_lease_s: float = Field(default=15.0, ge=1, description="a dead gateway's batch is taken over after this")
    batch_poll_s: float = Field(default=2.0, gt=0, description="how often a runner looks for batches to take")
    batch_drain_s: float = Field(default=30.0, ge=0, description="on shutdown, batch lines in flight get this long")
    batch_line_attempts: int = Field(default=8, ge=1, description="tries of a line whose upstream fails (5xx)")
    auth: AuthSettings = Field(default_factory=lambda: load_settings(AuthSettings),
                               description="web sign-in: the [auth] table (env APPLIANCE_AUTH_*)")

    audit_path: Path | None = Field(
        default=None, description="the audit log (JSON lines, hash-chained); default: data_dir/audit/audit.jsonl"
    )
    audit_anchor_every: int = Field(
        default=100, ge=1, description="every this many audit records the head (seq:hash) goes to the log"
    )
    audit_view_gap_s: float = Field(
        default=300.0, gt=0, description="an admin's reads count as a new admin.view after this long without any"
    )

    def resolved_audit_path(self) -> Path:
        return self.audit_path or default_audit_path(self.data_dir)

    @model_validator(mode="after")
    def _cache_bounds(self) -> GatewaySettings:
        if self.cache_ttl_s > self.cache_max_ttl_s:
            raise ValueError(f"cache_ttl_s ({self.cache_ttl_s}) is above cache_max_ttl_s ({self.cache_max_ttl_s})")
        if self.cache_max_entry_bytes > self.cache_max_bytes:
            raise ValueError(f"cache_max_entry_bytes ({self.cache_max_entry_bytes}) is above cache_max_bytes "
                             f"({self.cache_max_bytes})")
        return self

    @field_validator("balancer_url", "rag_url")
    @classmethod
    def _plain_http(cls, value: str) -> str:
        if not value.startswith("http://"):
            raise ValueError(f"must be http:// (internal services serve plain HTTP on the internal network): "
                             f"{value!r}")
        return value.rstrip("/")

    @field_validator("tls_names", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value
