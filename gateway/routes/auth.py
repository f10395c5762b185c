"""Web sign-in routes (contract C5): ``/auth/login`` and ``/auth/callback`` (OpenID Connect authorization code
flow with PKCE), ``/auth/logout`` (CSRF-checked by the session middleware) and ``/auth/me``.

A failed sign-in sends the browser back to the page it came from with ``?signin_error=<code>`` (a code of this
module's making, never text from the provider), which the sign-in page turns into a sentence.
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.params import FromQuery, QueryParameter

from appliance.core.errors import error_body, not_found, unauthorized
from gateway.audit_trail import audit
from gateway.auth.oidc import ProviderError
from gateway.auth.policy import Refusal, identity_from_claims
from gateway.auth.sessions import PreAuth, digest, new_secret
from gateway.auth.tokens import TokenRefused
from gateway.auth.web import STATE_KEY, SignedIn, WebAuth
from gateway.services import GatewayServices, Services

__all__ = ["HANDLERS", "callback", "login", "logout", "me"]

_log = logging.getLogger("gateway.auth")
_LOCAL_PATH = re.compile(r"/(?:[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*)?")  # "/", "/admin": never "//host" or a URL
_ERROR_CODE = re.compile(r"[a-z_]{1,40}")
_NO_STORE = {"Cache-Control": "no-store"}


def signed_in(request: Request[Any, Any, Any]) -> SignedIn | None:
    """The live session the middleware found for this request, if any."""
    found = request.scope.get("state", {}).get(STATE_KEY)
    return found if isinstance(found, SignedIn) else None


def _oidc(svc: GatewayServices) -> WebAuth:
    if svc.web_auth.oidc is None:
        raise not_found("Sign-in with an identity provider is not configured here ([auth] oidc_issuer).")
    return svc.web_auth


def _redirect(location: str, cookies: list[Cookie], status: int = 303) -> Response[Any]:
    return Response(b"", media_type="text/plain", status_code=status, headers={"Location": location, **_NO_STORE},
                    cookies=cookies)


@get("/auth/login", include_in_schema=False)
async def login(svc: Services, return_to: FromQuery[str] = "/") -> Response[Any]:
    """Start the authorization code flow: state, nonce and PKCE verifier kept server-side, bound to this browser."""
    auth = _oidc(svc)
    assert auth.oidc is not None
    target = return_to if _LOCAL_PATH.fullmatch(return_to) else "/"
    state, nonce, verifier, binding = new_secret(), new_secret(), new_secret() + new_secret(), new_secret()
    try:
        url = await auth.oidc.authorization_url(state=state, nonce=nonce, code_verifier=verifier)
    except ProviderError as exc:
        await _audit_failure(svc, exc.reason, None)
        return _back(auth, target, "provider_unavailable")
    await auth.preauth.put(state, PreAuth(nonce=nonce, code_verifier=verifier, binding=digest(binding),
                                          return_to=target))
    return _redirect(url, [auth.cookie(auth.preauth_cookie, binding, auth.settings.preauth_ttl_s)], status=302)


def _back(auth: WebAuth, target: str, code: str) -> Response[Any]:
    separator = "&" if "?" in target else "?"
    return _redirect(f"{target}{separator}signin_error={code}", [auth.cookie(auth.preauth_cookie, "", 0)])


async def _audit_failure(svc: GatewayServices, reason: str, subject: str | None) -> None:
    _log.warning("sign-in refused", extra={"reason": reason, "subject": subject or ""})
    target = f"user:{subject}" if subject else f"oidc:{svc.web_auth.settings.oidc_issuer}"
    await audit(svc.audit, f"user:{subject}" if subject else "anonymous", "auth.sign_in_failed", target,
                outcome="refused", detail={"reason": reason})


@get("/auth/callback", include_in_schema=False)
async def callback(request: Request[Any, Any, Any], svc: Services, *, code: FromQuery[str | None] = None,
                   oauth_state: Annotated[str | None, QueryParameter(name="state")] = None,
                   error: FromQuery[str | None] = None,
                   iss: FromQuery[str | None] = None) -> Response[Any]:
    """The provider sends the browser back here: check the pre-auth record, exchange the code, check the
    ID token, apply the sign-in policy, then open a session."""
    auth = _oidc(svc)
    assert auth.oidc is not None
    preauth = await auth.preauth.take(oauth_state) if oauth_state else None
    if preauth is None:
        await _audit_failure(svc, "unknown_or_expired_state", None)
        return _back(auth, "/", "expired")
    cookie = request.cookies.get(auth.preauth_cookie, "")
    if not cookie or not hmac.compare_digest(digest(cookie), preauth.binding):
        await _audit_failure(svc, "other_browser", None)  # a callback URL carried to another browser
        return _back(auth, preauth.return_to, "other_browser")
    if error is not None or not code:
        reason = f"provider_{error}" if error and _ERROR_CODE.fullmatch(error) else "provider_error"
        await _audit_failure(svc, reason, None)
        return _back(auth, preauth.return_to, "access_denied" if error == "access_denied" else "provider_error")
    if iss is not None and iss != auth.settings.oidc_issuer:  # RFC 9207: an answer from another provider
        await _audit_failure(svc, "issuer_mismatch", None)
        return _back(auth, preauth.return_to, "provider_error")
    return await _complete(svc, code, preauth)


async def _complete(svc: GatewayServices, code: str, preauth: PreAuth) -> Response[Any]:
    """Exchange the code, check the ID token, apply the policy, record the user, open the session."""
    auth = svc.web_auth
    assert auth.oidc is not None
    try:
        id_token = await auth.oidc.exchange(code=code, code_verifier=preauth.code_verifier)
        claims = await auth.oidc.verified_claims(id_token, nonce=preauth.nonce)
        identity = identity_from_claims(claims, auth.settings)
        user, created = await auth.users.sign_in(identity)
    except ProviderError as exc:
        await _audit_failure(svc, exc.reason, None)
        return _back(auth, preauth.return_to, "provider_error")
    except TokenRefused as exc:
        await _audit_failure(svc, f"id_token_{exc.reason}", None)
        return _back(auth, preauth.return_to, "token_refused")
    except Refusal as exc:
        await _audit_failure(svc, exc.reason, exc.subject)
        return _back(auth, preauth.return_to, exc.reason)
    session_id, _ = await auth.sessions.create(identity.subject)
    actor = f"user:{identity.subject}"
    if created:
        await audit(svc.audit, actor, "user.create", actor, detail={"role": user.role, "key_id": user.key_id})
    await audit(svc.audit, actor, "auth.sign_in", actor, detail={"role": user.role, "method": "oidc"})
    session_cookie = auth.cookie(auth.session_cookie, session_id, auth.settings.session_absolute_s)
    return _redirect(preauth.return_to, [session_cookie, auth.cookie(auth.preauth_cookie, "", 0)])


@post("/auth/logout", status_code=200, include_in_schema=False)
async def logout(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    """End this session (the server record is deleted: the cookie, replayed, finds nothing)."""
    found = signed_in(request)
    if found is None:
        raise unauthorized("Not signed in.")
    await svc.web_auth.sessions.delete(found.session)
    actor = f"user:{found.user.subject}"
    await audit(svc.audit, actor, "auth.sign_out", actor)
    return Response({"signed_out": True}, headers=_NO_STORE,
                    cookies=[svc.web_auth.cookie(svc.web_auth.session_cookie, "", 0)])


@get("/auth/me", include_in_schema=False)
async def me(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    """Who is signed in (with the CSRF token for state-changing calls), or 401 with the ways to sign in."""
    auth = svc.web_auth
    found = signed_in(request)
    provider = auth.settings.display_name if auth.oidc is not None else None
    if found is None:
        body = {**error_body("Not signed in.", "authentication_error", code="not_signed_in"),
                "methods": auth.methods, "provider": provider}
        return Response(body, status_code=401, headers=_NO_STORE)
    user = found.user
    return Response({
        "user": {"subject": str(user.subject), "email": user.email, "name": user.name, "role": user.role,
                 "groups": list(user.groups)},
        "csrf_token": found.session.csrf_token, "expires_at": found.session.expires_at,
        "methods": auth.methods, "provider": provider,
    }, headers=_NO_STORE)


HANDLERS = [login, callback, logout, me]
