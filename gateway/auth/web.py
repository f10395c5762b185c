"""Everything web sign-in needs, built once per app (:func:`new_web_auth`), and the cookies it sets."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.datastructures import Cookie
from redis.asyncio import Redis

from gateway.auth.oidc import OidcClient, new_oidc_http
from gateway.auth.sessions import PreAuthStore, Session, SessionStore
from gateway.auth.settings import AuthSettings
from gateway.auth.users import UserRecord, UserStore
from gateway.keys import KeyLimits, KeyStore

__all__ = ["SignedIn", "WebAuth", "new_web_auth"]

STATE_KEY = "web_session"  # where the session middleware leaves the SignedIn of a request (the ASGI scope's state)


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A request's live session and its user (set by the session middleware, read by the /auth routes)."""

    session: Session
    user: UserRecord


@dataclass(slots=True)
class WebAuth:
    settings: AuthSettings
    sessions: SessionStore
    preauth: PreAuthStore
    users: UserStore
    oidc: OidcClient | None
    cookie_secure: bool

    @property
    def session_cookie(self) -> str:
        # __Host-: the browser keeps it only if Secure, Path=/ and no Domain (no subdomain can plant one).
        return "__Host-appliance_session" if self.cookie_secure else "appliance_session"

    @property
    def preauth_cookie(self) -> str:
        return "__Host-appliance_preauth" if self.cookie_secure else "appliance_preauth"

    @property
    def methods(self) -> list[str]:
        return [*(["oidc"] if self.oidc is not None else []), *(["key"] if self.settings.key_sign_in else [])]

    def cookie(self, name: str, value: str, max_age: int) -> Cookie:
        """HttpOnly, SameSite=Lax (the provider's redirect back is a top-level GET), Path=/, Secure under TLS."""
        return Cookie(key=name, value=value, max_age=max_age, path="/", httponly=True, samesite="lax",
                      secure=self.cookie_secure)

    async def resolve(self, session_id: str) -> SignedIn | None:
        """The live session of this cookie and its user; None when it ended, or the user is disabled or gone."""
        session = await self.sessions.resolve(session_id)
        if session is None:
            return None
        user = await self.users.get(session.subject)
        if user is None or user.disabled:
            await self.sessions.delete(session)
            return None
        return SignedIn(session, user)

    async def close(self) -> None:
        if self.oidc is not None:
            await self.oidc.close()


def new_web_auth(settings: AuthSettings, redis: Redis, keys: KeyStore, *, default_limits: KeyLimits,
                 server_secret: str, tls: bool, oidc: OidcClient | None = None) -> WebAuth:
    """``oidc``: a client to use (tests); by default one is built when ``oidc_issuer`` is set."""
    if oidc is None and settings.oidc_enabled:
        oidc = OidcClient(settings, new_oidc_http(settings))
    return WebAuth(
        settings=settings,
        sessions=SessionStore(redis, idle_s=settings.session_idle_s, absolute_s=settings.session_absolute_s),
        preauth=PreAuthStore(redis, settings.preauth_ttl_s),
        users=UserStore(redis, keys, settings, default_limits=default_limits, server_secret=server_secret),
        oidc=oidc, cookie_secure=tls if settings.cookie_secure is None else settings.cookie_secure,
    )
