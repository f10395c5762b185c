"""The OpenID provider as the gateway talks to it: discovery, its signing keys, the authorization URL (PKCE
S256, state, nonce) and the code exchange, with Authlib's OAuth 2 client; ID tokens checked by
:func:`gateway.auth.tokens.validate_id_token`.

The HTTP client (an Authlib ``AsyncOAuth2Client``, an ``httpx2.AsyncClient`` holding the client id and
secret) is a constructor parameter: :func:`new_oidc_http` builds the real one. Discovery and keys are fetched
when first needed (a provider that is down does not stop the gateway) and kept for an hour; a token signed
with a key id the cached set lacks makes one refetch of the keys (at most every 30 s).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.integrations.httpx_client import OAuthError as AuthlibOAuthError
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from gateway.auth.settings import AuthSettings, is_loopback_url
from gateway.auth.tokens import ASYMMETRIC_ALGORITHMS, TokenRefused, validate_id_token

__all__ = ["OidcClient", "ProviderError", "ProviderMetadata", "new_oidc_http"]

_log = logging.getLogger("gateway.auth")
METADATA_TTL_S = 3600.0
KEYS_REFETCH_MIN_S = 30.0
_MAX_DOCUMENT_BYTES = 256 * 1024


class ProviderError(Exception):
    """The provider could not be used (unreachable, or an answer that breaks the protocol); ``reason`` is a code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: tuple[str, ...]


def new_oidc_http(settings: AuthSettings) -> AsyncOAuth2Client:
    """The OAuth 2 client for the provider: PKCE S256, client_secret_basic, explicit timeouts, the CA given."""
    verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(settings.ca_file))
                                     if settings.ca_file else True)
    return AsyncOAuth2Client(
        client_id=settings.client_id, client_secret=settings.client_secret(), scope=" ".join(settings.scopes),
        redirect_uri=settings.redirect_url, code_challenge_method="S256",
        token_endpoint_auth_method="client_secret_basic",  # noqa: S106 (a method name, not a secret)
        verify=verify, follow_redirects=False,
        timeout=httpx2.Timeout(settings.http_timeout_s, connect=min(5.0, settings.http_timeout_s)),
    )


def _endpoint(document: dict[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not (value.startswith("https://") or
                                          (value.startswith("http://") and is_loopback_url(value))):
        raise ProviderError(f"discovery_{name}")
    return value


class OidcClient:
    def __init__(self, settings: AuthSettings, http: AsyncOAuth2Client, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._http = http
        self._clock = clock
        self._metadata: tuple[ProviderMetadata, float] | None = None
        self._keys: tuple[KeySet, float] | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        await self._http.aclose()

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            response = await self._http.request("GET", url, headers={"Accept": "application/json"}, withhold_token=True)
        except httpx2.HTTPError as exc:
            _log.warning("openid provider unreachable", extra={"what": what, "error": type(exc).__name__})
            raise ProviderError(f"{what}_unreachable") from None
        if response.status_code != 200 or len(response.content) > _MAX_DOCUMENT_BYTES:
            _log.warning("openid provider answered badly", extra={"what": what, "status": response.status_code})
            raise ProviderError(f"{what}_status_{response.status_code}")
        try:
            document = response.json()
        except ValueError:
            raise ProviderError(f"{what}_not_json") from None
        if not isinstance(document, dict):
            raise ProviderError(f"{what}_not_json")
        return document

    async def metadata(self) -> ProviderMetadata:
        now = self._clock()
        if self._metadata is not None and now - self._metadata[1] < METADATA_TTL_S:
            return self._metadata[0]
        issuer = self._settings.oidc_issuer
        document = await self._get_json(f"{issuer.rstrip('/')}/.well-known/openid-configuration", "discovery")
        if document.get("issuer") != issuer:  # OpenID Connect Discovery 4.3: exactly the configured issuer
            raise ProviderError("discovery_issuer_mismatch")
        advertised = document.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = tuple(alg for alg in ASYMMETRIC_ALGORITHMS if alg in advertised)
        if not algorithms:
            raise ProviderError("discovery_no_asymmetric_algorithm")
        metadata = ProviderMetadata(
            issuer=issuer, authorization_endpoint=_endpoint(document, "authorization_endpoint"),
            token_endpoint=_endpoint(document, "token_endpoint"), jwks_uri=_endpoint(document, "jwks_uri"),
            algorithms=algorithms)
        self._metadata = (metadata, now)
        return metadata

    async def keys(self, *, refresh: bool = False) -> KeySet:
        async with self._lock:
            now = self._clock()
            if self._keys is not None and not (refresh and now - self._keys[1] >= KEYS_REFETCH_MIN_S):
                return self._keys[0]
            document = await self._get_json((await self.metadata()).jwks_uri, "jwks")
            try:
                keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
            except (JoseError, ValueError, TypeError, KeyError):
                raise ProviderError("jwks_invalid") from None
            self._keys = (keys, now)
            return keys

    async def authorization_url(self, *, state: str, nonce: str, code_verifier: str) -> str:
        metadata = await self.metadata()
        url, _ = self._http.create_authorization_url(metadata.authorization_endpoint, state=state,
                                                     code_verifier=code_verifier, nonce=nonce)
        return str(url)

    async def exchange(self, *, code: str, code_verifier: str) -> str:
        """The ID token the provider returns for this authorization code (sent with its PKCE verifier)."""
        metadata = await self.metadata()
        try:
            token = await self._http.fetch_token(metadata.token_endpoint, grant_type="authorization_code",
                                                 code=code, code_verifier=code_verifier)
        except AuthlibOAuthError as exc:
            _log.warning("openid provider refused the code", extra={"error": str(exc.error)[:64]})
            raise ProviderError("code_refused") from None
        except httpx2.HTTPError as exc:
            _log.warning("openid provider unreachable", extra={"what": "token", "error": type(exc).__name__})
            raise ProviderError("token_unreachable") from None
        except ValueError:
            raise ProviderError("token_not_json") from None
        id_token = token.get("id_token") if isinstance(token, dict) else None
        if not isinstance(id_token, str):
            raise ProviderError("no_id_token")
        return id_token

    async def verified_claims(self, id_token: str, *, nonce: str) -> dict[str, Any]:
        """The ID token's claims after every check; :class:`TokenRefused` when one fails."""
        metadata = await self.metadata()

        def check(keys: KeySet) -> dict[str, Any]:
            return validate_id_token(id_token, keys, issuer=metadata.issuer, client_id=self._settings.client_id,
                                     nonce=nonce, now=int(self._clock()), leeway=self._settings.clock_skew_s,
                                     algorithms=metadata.algorithms)

        try:
            return check(await self.keys())
        except TokenRefused as refused:
            if refused.reason != "unknown_key":
                raise
        return check(await self.keys(refresh=True))  # the provider may have rotated its keys since they were fetched
