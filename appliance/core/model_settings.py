"""The model catalogue as the admin configures it: ``[models]`` and its ``[[models.entry]]`` tables.

```toml
[models]
memory_budget = "24GiB"        # default: this host's RAM, or the GPUs' memory when a GPU is present
max_swap_wait_s = 30           # read by the balancer (swap-aware queue)
swap_policy = "grouped"

[[models.entry]]
alias = "chat"
path = "/srv/models/llama-3.1-8b-q4_k_m.gguf"
slots = 8
context = 8192                 # tokens per slot (n_ctx)
workers = 1
gpus = [0]                     # the GPUs its workers run on, one after another (local runtime)
resident = "always"            # or "on_demand": served by the shared swap hosts
allowed_sha256 = ["..."]
```

A file that needs no ``[models]`` keys may list the entries as ``[[models]]`` instead. Without any entry the
catalogue is the single model of ``[worker]`` (or ``appliance up --model/--served-name``): one entry,
resident, on every worker, as before. Parsed once into :class:`ModelsSettings` (env ``APPLIANCE_MODELS_*``;
``APPLIANCE_MODELS_ENTRY`` as a JSON list).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from appliance.core.ids import ModelId
from appliance.core.settings import CommonSettings, ConfigError, ReadValues, config_document

__all__ = ["DEFAULT_N_CTX", "DEFAULT_SLOTS", "ModelConfig", "ModelsSettings", "parse_bytes"]

# The worker's own defaults ([worker] slots, n_ctx): what an entry that names none gets.
DEFAULT_SLOTS, DEFAULT_N_CTX = 8, 8192
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", re.IGNORECASE)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_bytes(value: object) -> int:
    """``24GiB``, ``16 GB``, ``512MiB`` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size, e.g. 24GiB or 16GB")
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(str(value))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"a size such as 24GiB, 16GB or 512MiB, not {str(value)[:40]!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class ModelConfig(BaseModel):
    """One ``[[models.entry]]``."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    alias: str = Field(pattern=ModelId.anchored())
    path: Path
    slots: int | None = Field(default=None, ge=1, le=256)
    n_ctx: int | None = Field(default=None, ge=64, validation_alias=AliasChoices("context", "n_ctx"))
    workers: int = Field(default=1, ge=1, le=64, description="resident=always: dedicated workers")
    gpus: list[int] = Field(default_factory=list, description="the GPUs its workers run on, one after another")
    resident: Literal["always", "on_demand"] = "always"
    pinned: bool = False
    allowed_sha256: list[str] = Field(default_factory=list)

    @field_validator("gpus")
    @classmethod
    def _gpu_indexes(cls, value: list[int]) -> list[int]:
        if any(index < 0 for index in value):
            raise ValueError("GPU indexes are 0 or more")
        return value

    @field_validator("allowed_sha256")
    @classmethod
    def _hex(cls, value: list[str]) -> list[str]:
        lowered = [item.strip().lower() for item in value]
        bad = [item for item in lowered if not _SHA256.fullmatch(item)]
        if bad:
            raise ValueError("each allowed_sha256 must be 64 hex digits")
        return lowered

    @property
    def slots_or_default(self) -> int:
        return self.slots or DEFAULT_SLOTS

    @property
    def n_ctx_or_default(self) -> int:
        return self.n_ctx or DEFAULT_N_CTX


class _ModelsSource(ReadValues):
    """``[models]`` of appliance.toml, or ``[[models]]`` (a list) read as its entries."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, self._read())

    @staticmethod
    def _read() -> dict[str, Any]:
        path, document = config_document()
        if path is None:
            return {}
        values = {k: v for k, v in document.items() if not isinstance(v, dict | list)}
        table = document.get("models", {})
        if isinstance(table, list):
            values["entry"] = table
        elif isinstance(table, dict):
            values.update(table)
        else:
            raise ConfigError(f"{path}: models must be a table ([models]) or a list of tables ([[models]])")
        return values


class ModelsSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_MODELS_")
    toml_section: ClassVar[str] = "models"

    memory_budget: int | None = Field(
        default=None, ge=1, description="bytes the models may use together; default: RAM, or GPU memory with a GPU"
    )
    max_swap_wait_s: float = Field(default=30.0, ge=0)
    swap_policy: Literal["grouped", "fcfs"] = "grouped"
    swap_hosts: int | None = Field(
        default=None, ge=0, le=64,
        description="workers shared by the on_demand entries; default: what the budget allows",
    )
    entry: list[ModelConfig] = Field(default_factory=list)

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value in (None, "", 0, "0") else parse_bytes(value)

    @model_validator(mode="after")
    def _unique_aliases(self) -> ModelsSettings:
        seen: set[str] = set()
        for item in self.entry:
            if item.alias in seen:
                raise ValueError(f"the alias {item.alias!r} is listed twice")
            seen.add(item.alias)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ModelsSource(settings_cls))
