"""The worker's one settings object (env ``APPLIANCE_WORKER_*``, toml ``[worker]``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from appliance.core.model_files import DEFAULT_MODEL_ALIAS
from appliance.core.redis_settings import RedisClientSettings

__all__ = ["WorkerSettings"]


def _list_from_env(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string for list fields."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class WorkerSettings(RedisClientSettings):
    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_WORKER_",
        frozen=True,
        extra="ignore",
        populate_by_name=True,
    )
    toml_section: ClassVar[str] = "worker"

    host: str = "127.0.0.1"
    port: int = Field(default=8201, ge=1, le=65535)
    model_path: str = Field(default="", description="GGUF file; empty = the bundled default under data_dir/models")
    model_alias: str = Field(default=DEFAULT_MODEL_ALIAS, min_length=1)
    slots: int = Field(default=8, ge=1, le=256, description="sequences decoded together")
    # Per slot: RAG context (rag_max_context_chars 12000 ~ 3-4k tokens) plus a real conversation and its answer.
    n_ctx: int = Field(default=8192, ge=64, description="context tokens per slot (prompt and answer together)")
    n_threads: int = Field(default=0, ge=0, description="0 = the machine's cores")
    n_gpu_layers: int = Field(default=-1, ge=-1, description="-1 = all when a GPU build and device exist, else 0")
    main_gpu: int = Field(default=0, ge=0)
    tensor_split: Annotated[list[float], NoDecode] = Field(default_factory=list)
    max_tokens_cap: int = Field(default=2048, ge=1, description="longest answer a request may ask for")
    queue_size: int = Field(default=64, ge=0, description="requests waiting for a slot before 503")
    max_prompts: int = Field(default=16, ge=1, le=4096,
                             description="prompts one /v1/completions request may hold (each takes n slots)")
    prefill_chunk: int = Field(default=256, ge=16, description="prompt tokens per decode step (chunked prefill)")
    chat_template: str = Field(default="", description="Jinja chat template, or a path to one; empty = model's own")
    allowed_sha256: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Prompt-prefix reuse (docs/CONTRACTS.md): finished sequences keep their KV cells for the next prompt.
    prefix_reuse: bool = Field(
        default=True, description="reuse cached prompt prefixes and answers (faster later turns)"
    )
    deterministic: bool = Field(
        default=False,
        description="CPU: batch-invariant decoding (an answer is the same bit for bit with reuse and speculation "
        "on or off), at the cost of the fastest kernels; false = fast kernels, one unified KV cache",
    )
    speculative: bool = Field(
        default=True, description="draft tokens from the prompt (prompt lookup) where a request's acceptance pays"
    )
    draft_max: int = Field(default=8, ge=1, le=64, description="most draft tokens per sequence and step")
    draft_probe_every: int = Field(
        default=48, ge=1, le=4096,
        description="a sequence whose drafts do not pay (measured acceptance and step costs) tries one again "
                    "after this many steps, so a quoting stretch later in an answer is still found")
    # Decode lanes (inference.lanes): batch-priority work takes the compute interactive work leaves.
    batch_lane_busy: int = Field(
        default=4, ge=0, le=256,
        description="batch sequences that keep stepping while interactive ones run, lines under way before new "
                    "prompts (the others pause, their KV kept); 0 = the batch lane pauses; an interactive prompt's "
                    "prefill always steps without batch rows")
    batch_lane_grace_s: float = Field(
        default=1.0, ge=0, le=60,
        description="the batch lane stays shrunk this long after the last interactive sequence (a chat's next turn)")
    prefix_share_across_keys: bool = Field(
        default=False, description="let one API key's requests reuse prefixes another key's requests left"
    )
    prompt_cache_bytes: int = Field(
        default=256 << 20, ge=0, description="host-RAM cache of prefixes evicted from slots; 0 = none"
    )
    prompt_cache_disk_bytes: int = Field(
        default=1 << 30, ge=0,
        description="bytes of saved prompt caches under data_dir/kvcache (every model together): a model's host-RAM "
                    "cache and its slots' cells are saved when it is unloaded and read back when it loads again; "
                    "0 = never saved",
    )
    prompt_cache_save_on_stop: bool = Field(
        default=True, description="save the prompt cache on a graceful stop too, for the next start of the model"
    )
    # Swap host (docs/CONTRACTS.md C2): serves any on_demand catalogue entry, one at a time (POST /admin/model).
    swap_host: bool = Field(default=False, description="load catalogue entries on demand instead of model_path")
    initial_model: str = Field(
        default="", description="swap host: the catalogue alias it loads at start; empty = it starts with none"
    )
    memory_bytes: int = Field(
        default=0, ge=0,
        description="memory this worker may use (weights + slots x n_ctx KV); a swap host refuses a larger entry; "
                    "0 = not bounded",
    )
    settle_s: float = Field(
        default=2.0, ge=0, le=60,
        description="how long a swap (before 409) or a stop (before saving the cache) waits for the slots of "
                    "requests whose clients went away to empty",
    )
    # Worker registry (docs/CONTRACTS.md): announce this worker to balancers through Redis once ready.
    redis_url: str = Field(default="", repr=False, description="empty = no registration (static balancer list)")
    redis_username: str = Field(default="worker", description="Redis ACL user this service logs in as")
    advertise_url: str = Field(
        default="", validate_default=True, description="base URL balancers use; empty = http://host:port"
    )
    heartbeat_s: float = Field(default=2.0, gt=0, description="registry key refresh interval")
    registry_ttl_s: float = Field(
        default=6.0, gt=0, validate_default=True, description="the key expires this long after the last refresh"
    )
    withdraw_grace_s: float = Field(
        default=3.0, ge=0, description="keep serving this long after withdrawing (above the balancers' registry_poll_s)"
    )
    shutdown_drain_s: float = Field(
        default=300.0, gt=0, description="on SIGTERM, in-flight generations (long streams) get this long to finish"
    )

    @field_validator("tensor_split", "allowed_sha256", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _list_from_env(value)

    @field_validator("allowed_sha256")
    @classmethod
    def _hex_digests(cls, value: list[str]) -> list[str]:
        digests = [item.lower() for item in value]
        for item in digests:
            if len(item) != 64 or any(c not in "0123456789abcdef" for c in item):
                raise ValueError(f"not a sha256 hex digest: {item!r}")
        return digests

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("advertise_url")
    @classmethod
    def _advertised(cls, value: str, info: ValidationInfo) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s):// base URL")
        if not value and info.data.get("redis_url") and info.data.get("host") in {"0.0.0.0", "::", ""}:  # noqa: S104
            raise ValueError("required with redis_url when host is a wildcard address: the URL balancers use")
        return value

    @field_validator("registry_ttl_s")
    @classmethod
    def _outlives_heartbeat(cls, value: float, info: ValidationInfo) -> float:
        if value <= info.data.get("heartbeat_s", 0):
            raise ValueError("must be longer than heartbeat_s (3x is a good choice)")
        return value

    @model_validator(mode="after")
    def _swap_host_reads_the_catalogue(self) -> WorkerSettings:
        if self.swap_host and not self.redis_url:
            raise ValueError("swap_host needs redis_url: a swap host loads models from the catalogue in Redis")
        if self.initial_model and not self.swap_host:
            raise ValueError("initial_model is for a swap host (swap_host = true); others serve model_path")
        return self

    def resolved_advertise_url(self) -> str:
        """The base URL this worker registers under (the balancer's spelling: no trailing slash)."""
        return (self.advertise_url or f"http://{self.host}:{self.port}").rstrip("/")

    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1

    def template_source(self) -> str | None:
        """The configured chat template text (read from a file when it names one)."""
        if not self.chat_template:
            return None
        candidate = Path(self.chat_template)
        if "{" not in self.chat_template and candidate.is_file():
            return candidate.read_text(encoding="utf-8")
        return self.chat_template
