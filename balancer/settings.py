"""The balancer's one typed settings object (env ``APPLIANCE_BALANCER_*``, toml ``[balancer]``)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from appliance.core.redis_settings import RedisClientSettings

__all__ = ["BalancerSettings", "normalise_worker_url"]


def normalise_worker_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` → ``http://host:port`` (one spelling per worker)."""
    url = url.strip().rstrip("/")
    if not url:
        raise ValueError("empty worker URL")
    if "://" not in url:
        url = f"http://{url}"
    if not url.startswith("http://"):
        raise ValueError(f"worker URL must be http:// (workers serve plain HTTP on the internal network): {url!r}")
    return url


class BalancerSettings(RedisClientSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_BALANCER_")
    toml_section = "balancer"

    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=1, le=65535)
    workers: Annotated[tuple[str, ...], NoDecode] = ()
    strategy: Literal["least_connections", "round_robin"] = "least_connections"
    routing: Literal["prefix", "least_connections"] = Field(
        default="prefix",
        description="prefix: send a conversation to the worker that served its earlier turns (hash chain over the "
        "messages, scoped by key id) unless that worker is much busier than the least busy one; "
        "least_connections: ignore prefixes (``strategy`` picks).",
    )
    prefix_max_imbalance: float = Field(
        default=0.5, ge=0,
        description="Prefix affinity holds while the worker's load (in-flight / slots) is at most this much above "
        "the least busy worker's.",
    )
    prefix_table_size: int = Field(default=65536, ge=16, description="Prefix hashes remembered (LRU).")
    scheduling: Literal["fair", "fifo"] = Field(
        default="fair",
        description="fair: weighted fair queue between API keys (tokens, interactive before batch); "
        "fifo: arrival order.",
    )
    interactive_headroom: int = Field(
        default=1, ge=0,
        description="fair scheduling only: slots per model kept for an interactive key with nothing running "
        "(a person at a chat prompt) while other keys' requests wait, capped at a quarter of the model's slots "
        "(0 = every slot to whoever is first in the fair queue). Without it, a new chat request behind a "
        "heavy key's backlog waits for the next request to end.",
    )
    queue_notice_after_s: float = Field(
        default=1.0, ge=0,
        description="A streaming request queued this long gets '200' and ': queued position=N eta_s=X' SSE "
        "comments while it waits (0 = from the start).",
    )
    queue_notice_interval_s: float = Field(default=1.0, gt=0, description="Seconds between queue comments.")
    queue_size: int = Field(default=256, ge=0, description="Requests that may wait for a free slot.")
    queue_timeout_s: float = Field(default=30.0, gt=0)
    probe_interval_s: float = Field(default=2.0, gt=0)
    probe_timeout_s: float = Field(default=2.0, gt=0)
    eject_after_failed_probes: int = Field(default=2, ge=1)
    readmit_after_good_probes: int = Field(default=2, ge=1)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    first_byte_timeout_s: float = Field(
        default=60.0, gt=0, description="Streaming requests: time until the first body byte (hang detection)."
    )
    read_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest silence between two reads; no total timeout."
    )
    worker_keepalive_s: float = Field(
        default=30.0, gt=0, lt=75,
        description="How long an idle connection to a worker is kept for the next request. Below the workers' own "
        "idle timeout (aiohttp's 75 s), so a worker does not close a connection just as a request is written on it.",
    )
    max_attempts: int = Field(default=3, ge=1, le=3)
    retry_budget_ratio: float = Field(default=0.2, ge=0, description="Retry tokens earned per request.")
    retry_budget_burst: float = Field(default=10.0, ge=0, description="Retry tokens held at most.")
    redis_url: str = Field(default="", repr=False, description="Optional worker registry (heartbeat keys with TTL).")
    redis_username: str = Field(default="balancer", description="Redis ACL user this service logs in as")
    registry_poll_s: float = Field(default=2.0, gt=0)
    shutdown_drain_s: float = Field(
        default=300.0, gt=0, description="On SIGTERM, in-flight requests (long streams) get this long to finish."
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="413 past this; above the gateway's 1 MiB (room for RAG context)."
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _split_workers(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
        if isinstance(value, list | tuple):
            return tuple(normalise_worker_url(str(item)) for item in value)
        return value
