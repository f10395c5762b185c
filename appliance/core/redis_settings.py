"""The Redis login every Redis-using service shares: which ACL user it is and where its password lives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from appliance.core.redis_auth import checked_password_file, login_kwargs
from appliance.core.settings import CommonSettings

__all__ = ["RedisClientSettings"]


class RedisClientSettings(CommonSettings):
    """A service's settings base when it talks to Redis; each service sets its own ``redis_username`` default."""

    redis_url: str = Field(default="", repr=False)
    redis_username: str = Field(default="default", description="Redis ACL user this service logs in as")
    redis_password_file: Path | None = Field(
        default=None, description="file holding that user's Redis password (0600; a Docker or Kubernetes secret); "
        "unset: the URL's own credentials, if any"
    )

    @field_validator("redis_password_file")
    @classmethod
    def _readable_password(cls, value: Path | None) -> Path | None:
        return checked_password_file(value)

    def redis_login(self) -> dict[str, Any]:
        """Keyword arguments that log the Redis client in as this service's user."""
        return login_kwargs(self.redis_username, self.redis_password_file)
