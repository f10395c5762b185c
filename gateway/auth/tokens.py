"""ID token checks (OpenID Connect Core 3.1.3.7) with joserfc: signature by the provider's keys, ``iss``,
``aud`` (and ``azp`` when there are several audiences), ``exp``/``iat`` with a bounded clock skew, ``nonce``.

Only asymmetric algorithms the provider advertises are accepted: never ``none``, never an HMAC (so a public
key can never be used as an HMAC secret). A refusal names the reason, never the token.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet

__all__ = ["ASYMMETRIC_ALGORITHMS", "MAX_TOKEN_CHARS", "TokenRefused", "validate_id_token"]

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
MAX_TOKEN_CHARS = 16 * 1024


class TokenRefused(Exception):
    """The ID token is not acceptable; ``reason`` is a short code (for the audit log and the user's message)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def validate_id_token(token: str, keys: KeySet, *, issuer: str, client_id: str, nonce: str, now: int,
                      leeway: int, algorithms: Collection[str] = ASYMMETRIC_ALGORITHMS) -> dict[str, Any]:
    """The token's claims once every check passed; :class:`TokenRefused` otherwise (``unknown_key``: a key id
    the key set lacks, the one refusal that fetching the provider's keys again may cure)."""
    allowed = [alg for alg in algorithms if alg in ASYMMETRIC_ALGORITHMS]
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise TokenRefused("malformed")
    try:
        decoded = jwt.decode(token, keys, algorithms=allowed)
    except BadSignatureError:
        raise TokenRefused("bad_signature") from None
    except InvalidKeyIdError:
        raise TokenRefused("unknown_key") from None
    except (JoseError, ValueError):
        raise TokenRefused("malformed") from None
    claims = dict(decoded.claims)
    registry = jwt.JWTClaimsRegistry(
        now=now, leeway=leeway,
        iss={"essential": True, "value": issuer}, aud={"essential": True, "value": client_id},
        sub={"essential": True}, exp={"essential": True}, iat={"essential": True},
        nonce={"essential": True, "value": nonce},
    )
    try:
        registry.validate(claims)
    except ExpiredTokenError:
        raise TokenRefused("expired") from None
    except MissingClaimError as exc:
        raise TokenRefused(f"missing_{_claim_name(exc)}") from None
    except InvalidClaimError as exc:
        raise TokenRefused(f"invalid_{_claim_name(exc)}") from None
    except JoseError:
        raise TokenRefused("invalid_claims") from None
    audience = claims.get("aud")
    if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != client_id:
        raise TokenRefused("invalid_azp")
    if not isinstance(claims.get("sub"), str):
        raise TokenRefused("invalid_sub")
    return claims


def _claim_name(exc: JoseError) -> str:
    name = str(getattr(exc, "claim", "") or "").strip()
    return name if name.isidentifier() else "claim"
