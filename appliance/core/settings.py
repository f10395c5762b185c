"""Typed, immutable settings: one object per service, parsed once at start.

Sources, highest precedence first: explicit keyword arguments, environment
variables (``APPLIANCE_<SERVICE>_<FIELD>``; the shared fields use
``APPLIANCE_<FIELD>``), the service's table in ``appliance.toml`` (top-level
keys are shared by every service), then defaults.

The TOML file is ``$APPLIANCE_CONFIG`` if set, else ``./appliance.toml`` if it
exists. Invalid configuration raises :class:`ConfigError` with one readable
line per problem.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["MIN_INTERNAL_TOKEN_CHARS", "CommonSettings", "ConfigError", "ReadValues", "config_document",
           "config_path", "load_settings"]

# The internal token guards every internal hop and signs worker registrations: shorter than this is refused
# (a typo or a placeholder), never read as "no authentication". The generated one has 43 characters.
MIN_INTERNAL_TOKEN_CHARS = 32

S = TypeVar("S", bound="CommonSettings")


class ConfigError(Exception):
    """Configuration that cannot be used; the message is for an operator."""


def config_path() -> Path | None:
    explicit = os.environ.get("APPLIANCE_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"APPLIANCE_CONFIG points at {path}, which is not a readable file")
        return path
    default = Path("appliance.toml")
    return default if default.is_file() else None


def config_document() -> tuple[Path | None, dict[str, Any]]:
    """appliance.toml parsed (its path, its tables), or ``(None, {})`` without one; a broken file is a ConfigError."""
    path = config_path()
    if path is None:
        return None, {}
    try:
        return path, tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _shared(name: str) -> AliasChoices:
    return AliasChoices(name, f"APPLIANCE_{name.upper()}")


class ReadValues(PydanticBaseSettingsSource):
    """A settings source that answers from values read once (appliance.toml's tables, named environment)."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class _TomlSection(ReadValues):
    """Top-level keys of appliance.toml plus the service's own table."""

    def __init__(self, settings_cls: type[BaseSettings], section: str) -> None:
        super().__init__(settings_cls, self._read(section))

    @staticmethod
    def _read(section: str) -> dict[str, Any]:
        path, document = config_document()
        if path is None:
            return {}
        values = {k: v for k, v in document.items() if not isinstance(v, dict)}
        own = document.get(section, {})
        if not isinstance(own, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        values.update(own)
        return values


class CommonSettings(BaseSettings):
    """Fields every service shares. Subclasses set ``toml_section`` and an env prefix."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)
    toml_section: ClassVar[str] = ""

    data_dir: Path = Field(default=Path("data"), validation_alias=_shared("data_dir"))
    internal_token: str = Field(
        default="",
        validation_alias=_shared("internal_token"),
        description="Shared secret for internal hops (at least 32 characters); empty means read or create "
        "data/run/internal_token.",
        repr=False,
    )
    log_level: str = Field(
        default="INFO", validation_alias=_shared("log_level"), pattern=r"^(DEBUG|INFO|WARNING|ERROR)$"
    )
    log_json: bool = Field(default=True, validation_alias=_shared("log_json"))

    @field_validator("internal_token")
    @classmethod
    def _strong_token(cls, value: str) -> str:
        if value and len(value.strip()) < MIN_INTERNAL_TOKEN_CHARS:
            raise ValueError(
                f"must be at least {MIN_INTERNAL_TOKEN_CHARS} characters (it has {len(value.strip())}); "
                "generate one with: openssl rand -hex 32"
            )
        return value.strip()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSection(settings_cls, cls.toml_section))

    def resolved_internal_token(self) -> str:
        """The internal token, created once (mode 0600) under the data dir if unset.

        Raises :class:`ConfigError` when the file holds fewer than 32 characters (emptied, truncated or
        hand-edited): an empty token would let any request through the internal hops.
        """
        if self.internal_token:
            return self.internal_token
        path = self.data_dir / "run" / "internal_token"
        if path.is_file():
            return _checked_token_file(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # first writer wins if two services race
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return _checked_token_file(path)


def _checked_token_file(path: Path) -> str:
    token = path.read_text().strip()
    if len(token) < MIN_INTERNAL_TOKEN_CHARS:
        raise ConfigError(
            f"the internal token in {path} has {len(token)} characters, fewer than {MIN_INTERNAL_TOKEN_CHARS}: "
            "refusing to start (delete the file to generate a new one, and restart every service)"
        )
    return token


def _describe(exc: ValidationError, cls: type[CommonSettings]) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(settings)"
        env = f"{prefix}{field.upper()}" if prefix else field
        where = f"[{cls.toml_section}] {field}"
        info = cls.model_fields.get(field)
        if info is not None and isinstance(info.validation_alias, AliasChoices):  # a shared field
            env = next((str(c) for c in info.validation_alias.choices if str(c).startswith("APPLIANCE_")), env)
            where = f"top-level {field} in appliance.toml"
        lines.append(f"  {field} (env {env} or {where}): {err['msg']}")
    return f"invalid {cls.toml_section or 'appliance'} configuration:\n" + "\n".join(lines)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Parse the settings once; turn validation failures into a ConfigError."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, cls)) from None
