"""The balancer's one typed settings object (env ``APPLIANCE_BALANCER_*``, toml ``[balancer]``)."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from appliance.core.redis_settings import RedisClientSettings
from appliance.core.settings import ReadValues, config_document

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
    # Model swapping (issue 29): also read from [models] of appliance.toml, below [balancer] (balancer.swaps).
    max_swap_wait_s: float = Field(
        default=30.0, ge=0,
        description="grouped swaps: a swap host keeps serving its model while that model has work, unless a model "
        "that needs the host has waited this long (then the host is drained and loads it).",
    )
    swap_policy: Literal["grouped", "fcfs"] = Field(
        default="grouped",
        description="grouped: group requests by model with the bounded wait above; fcfs: swap as soon as the oldest "
        "waiting request is for another model (what llama-swap does; for comparison).",
    )
    swap_queue_timeout_s: float = Field(
        default=120.0, gt=0,
        description="How long a request for an on_demand model may wait (in place of queue_timeout_s: its host may be "
        "swapped away and back meanwhile); one whose expected wait for a load is longer gets 503 with Retry-After at "
        "once.",
    )
    swap_load_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest a swap host may take to answer POST /admin/model (load + restore)."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        own = super().settings_customise_sources(settings_cls, init_settings, env_settings, dotenv_settings,
                                                 file_secret_settings)
        return (*own, _ModelsTable(settings_cls))

    @field_validator("workers", mode="before")
    @classmethod
    def _split_workers(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
        if isinstance(value, list | tuple):
            return tuple(normalise_worker_url(str(item)) for item in value)
        return value


_SWAP_FIELDS = ("max_swap_wait_s", "swap_policy", "swap_queue_timeout_s", "swap_load_timeout_s")


class _ModelsTable(ReadValues):
    """The swap settings from ``[models]`` of appliance.toml (where the model catalogue is configured) and from
    ``APPLIANCE_MODELS_*`` over it; ``APPLIANCE_BALANCER_*`` and ``[balancer]`` come first."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, {**self._read(), **self._environment()})

    @staticmethod
    def _read() -> dict[str, Any]:
        path, document = config_document()
        if path is None:
            return {}
        table = document.get("models", {})
        if not isinstance(table, dict):  # [[models]] (the catalogue's entries) is a list: no settings there
            return {}
        return {name: table[name] for name in _SWAP_FIELDS if name in table}

    @staticmethod
    def _environment() -> dict[str, Any]:
        """``APPLIANCE_MODELS_<FIELD>``, the [models] table's own environment names (compose passes those)."""
        found = {name: os.environ.get(f"APPLIANCE_MODELS_{name.upper()}") for name in _SWAP_FIELDS}
        return {name: value for name, value in found.items() if value is not None}
