"""Web sign-in settings: the ``[auth]`` table of appliance.toml (env ``APPLIANCE_AUTH_*``), part of the gateway's.

OIDC is on when ``oidc_issuer`` is set; then ``client_id``, ``client_secret_file`` and ``redirect_url`` are
required. The client secret is read from its file once, never logged, never part of a repr or an error.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from appliance.core.settings import CommonSettings

__all__ = ["AuthSettings", "GroupLimits", "is_loopback_url"]


class GroupLimits(BaseModel):
    """Default limits of a user key made for a member of a group (unset: the gateway's ``default_*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    tpd: int | None = Field(default=None, ge=0)
    max_concurrent: int | None = Field(default=None, ge=0)


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class AuthSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_AUTH_", frozen=True, extra="ignore", populate_by_name=True)
    toml_section: ClassVar[str] = "auth"

    oidc_issuer: str = Field(default="", description="the OpenID provider's issuer URL; empty: no OIDC sign-in")
    client_id: str = ""
    client_secret_file: Path | None = Field(default=None, description="file holding the client secret (0600)")
    redirect_url: str = Field(default="", description="this gateway's /auth/callback as the browser reaches it")
    provider_name: str = Field(default="", description="shown as 'Sign in with <name>'; default: the issuer's host")
    scopes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["openid", "email", "profile"])
    allowed_email_domains: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_groups: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_groups: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="members of these groups get the admin role (the key's admin scope)")
    groups_claim: str = Field(default="groups", description="the ID token claim that lists the user's groups")
    require_verified_email: bool = Field(
        default=True, description="with allowed_email_domains: the email_verified claim must be true")
    group_limits: dict[str, GroupLimits] = Field(
        default_factory=dict, description="per group, default limits of a new user's key (first listed group wins)")
    user_scopes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["chat", "embeddings", "collections"])
    allow_key_sign_in: bool | None = Field(
        default=None, description="the web UI accepts a pasted API key; default: true without oidc_issuer")
    session_idle_s: int = Field(default=2 * 3600, ge=60, description="a session unused this long ends")
    session_absolute_s: int = Field(default=12 * 3600, ge=300, description="a session ends this long after sign-in")
    preauth_ttl_s: int = Field(default=600, ge=30, le=3600, description="time to finish signing in at the IdP")
    cookie_secure: bool | None = Field(default=None, description="Secure cookies; default: when the gateway serves TLS")
    ca_file: Path | None = Field(default=None, description="CA bundle for the IdP's certificate (a private CA)")
    http_timeout_s: float = Field(default=10.0, gt=0, le=120)
    clock_skew_s: int = Field(default=60, ge=0, le=600)

    @field_validator("scopes", "allowed_email_domains", "allowed_groups", "admin_groups", "user_scopes",
                     mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _csv(value)

    @field_validator("allowed_email_domains")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [domain.lower().lstrip("@") for domain in value]

    @field_validator("oidc_issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        value = value.strip()  # kept exactly: the ID token's iss must equal it (a trailing / included)
        if value and not (value.startswith("https://") or (value.startswith("http://") and is_loopback_url(value))):
            raise ValueError("must be an https:// URL (plain http only for a provider on this host's loopback)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> AuthSettings:
        if not self.oidc_issuer:
            return self
        missing = [name for name in ("client_id", "redirect_url") if not getattr(self, name)]
        if self.client_secret_file is None:
            missing.append("client_secret_file")
        if missing:
            raise ValueError(f"oidc_issuer is set, so {', '.join(missing)} must be set too")
        if not self.redirect_url.startswith(("https://", "http://")) or not self.redirect_url.endswith(
                "/auth/callback"):
            raise ValueError("redirect_url must be this gateway's http(s)://HOST[:PORT]/auth/callback")
        if "openid" not in self.scopes:
            raise ValueError("scopes must include openid")
        if self.session_idle_s > self.session_absolute_s:
            raise ValueError("session_idle_s is above session_absolute_s")
        path = self.client_secret_file
        assert path is not None
        if not path.is_file() or not os.access(path, os.R_OK) or not path.read_text().strip():
            raise ValueError(f"client_secret_file {path} is not a readable, non-empty file")
        return self

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer)

    @property
    def key_sign_in(self) -> bool:
        return (not self.oidc_enabled) if self.allow_key_sign_in is None else self.allow_key_sign_in

    @property
    def display_name(self) -> str:
        return self.provider_name or (urlsplit(self.oidc_issuer).hostname or "your identity provider")

    def client_secret(self) -> str:
        """The client secret from its file (only the OIDC client holds it)."""
        if self.client_secret_file is None:
            return ""
        return self.client_secret_file.read_text().strip()

    def limits_for(self, groups: list[str]) -> GroupLimits:
        for group, limits in self.group_limits.items():
            if group in groups:
                return limits
        return GroupLimits()
