"""ID token checks (gateway/auth/tokens.py) against tokens made here with joserfc keys, and the sign-in policy
(gateway/auth/policy.py): who may sign in and with which role."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from gateway.auth.policy import Identity, Refusal, identity_from_claims
from gateway.auth.settings import AuthSettings
from gateway.auth.tokens import TokenRefused, validate_id_token

ISSUER, CLIENT, NONCE = "https://idp.example.com", "appliance-web", "nonce-0123456789abcdef0123456789abcdef"
NOW = 1_800_000_000
SIGNER = RSAKey.generate_key(2048, parameters={"kid": "signer"}, private=True)
PUBLISHED = KeySet([RSAKey.import_key(SIGNER.as_dict(private=False))])


def _claims(**changes: Any) -> dict[str, Any]:
    base = {"iss": ISSUER, "aud": CLIENT, "sub": "alice", "exp": NOW + 300, "iat": NOW, "nonce": NONCE,
            "email": "alice@example.com", "groups": ["staff"]}
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


def _token(claims: dict[str, Any] | None = None, key: Any = SIGNER, alg: str = "RS256", kid: str = "signer") -> str:
    return jwt.encode({"alg": alg, "kid": kid}, claims or _claims(), key)


def _verdict(token: str, now: int = NOW, nonce: str = NONCE) -> str:
    try:
        claims = validate_id_token(token, PUBLISHED, issuer=ISSUER, client_id=CLIENT, nonce=nonce, now=now,
                                   leeway=60)
    except TokenRefused as refused:
        return refused.reason
    return f"accepted {claims['sub']}"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_a_good_token_is_accepted_and_the_clock_skew_is_bounded() -> None:
    assert _verdict(_token()) == "accepted alice"
    assert _verdict(_token(), now=NOW + 300 + 59) == "accepted alice"  # within the 60 s leeway
    assert _verdict(_token(), now=NOW + 300 + 61) == "expired"
    assert _verdict(_token(_claims(iat=NOW + 3600))) == "invalid_iat"  # issued in the future


@pytest.mark.parametrize(("claims", "reason"), [
    (_claims(iss="https://evil.example.com"), "invalid_iss"),
    (_claims(iss=ISSUER + "/"), "invalid_iss"),
    (_claims(aud="another-client"), "invalid_aud"),
    (_claims(aud=["another-client", CLIENT]), "invalid_azp"),  # several audiences and no azp for us
    (_claims(nonce="replayed-nonce"), "invalid_nonce"),
    (_claims(nonce=None), "missing_nonce"),
    (_claims(exp=None), "missing_exp"),
    (_claims(sub=None), "missing_sub"),
])
def test_a_token_for_someone_else_or_another_sign_in_is_refused(claims: dict[str, Any], reason: str) -> None:
    assert _verdict(_token(claims)) == reason


def test_signatures_from_anyone_but_the_provider_are_refused() -> None:
    stranger = RSAKey.generate_key(2048, parameters={"kid": "signer"}, private=True)
    assert _verdict(_token(key=stranger)) == "bad_signature"  # same kid, another key
    assert _verdict(_token(key=stranger, kid="rotated")) == "unknown_key"  # the one case a key refetch may cure
    ec = ECKey.generate_key("P-256", private=True)
    assert _verdict(_token(key=ec, alg="ES256")) in {"bad_signature", "malformed", "unknown_key"}
    # alg "none", and HS256 keyed with the provider's public key (algorithm confusion): never accepted.
    header, payload, _ = _token().split(".")
    assert _verdict(f"{_b64({'alg': 'none', 'kid': 'signer'})}.{payload}.") == "malformed"
    public_pem = RSAKey.import_key(SIGNER.as_dict(private=False)).as_pem(private=False)
    signing_input = f"{_b64({'alg': 'HS256', 'kid': 'signer'})}.{payload}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()  # joserfc refuses to make this
    assert _verdict(f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}") == "malformed"
    # Claims edited after signing (a tampered payload with the original signature).
    forged = f"{header}.{_b64(_claims(sub='root', groups=['appliance-admins']))}.{_token().split('.')[2]}"
    assert _verdict(forged) == "bad_signature"
    assert _verdict("") == "malformed" and _verdict("x" * 20_000) == "malformed" and _verdict("a.b.c") == "malformed"


GOOD = _token()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(min_value=0, max_value=len(GOOD) - 1),
       replacement=st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."))
@example(position=len(GOOD) - 1, replacement="A")
@example(position=GOOD.index(".") + 5, replacement="x")
def test_no_one_character_change_yields_other_claims(position: int, replacement: str) -> None:
    """Any character of the token changed: refused, or (a base64 padding bit) the very same claims."""
    tampered = GOOD[:position] + replacement + GOOD[position + 1:]
    try:
        claims = validate_id_token(tampered, PUBLISHED, issuer=ISSUER, client_id=CLIENT, nonce=NONCE, now=NOW,
                                   leeway=60)
    except TokenRefused:
        return
    assert claims == _claims()


def _settings(tmp_path: Path, **values: Any) -> AuthSettings:
    secret = tmp_path / "secret"
    secret.write_text("client-secret-0123456789abcdef0123456789")
    return AuthSettings(oidc_issuer=ISSUER, client_id=CLIENT, client_secret_file=secret,
                        redirect_url="https://chat.example.com/auth/callback", **values)


def _identity(tmp_path: Path, claims: dict[str, Any], **values: Any) -> Identity | str:
    try:
        return identity_from_claims(claims, _settings(tmp_path, **values))
    except Refusal as refused:
        return refused.reason


def test_groups_and_domains_decide_who_signs_in_and_the_admin_groups_the_role(tmp_path: Path) -> None:
    policy = {"allowed_groups": ["staff"], "admin_groups": ["appliance-admins"]}
    alice = _identity(tmp_path, _claims(), **policy)
    assert isinstance(alice, Identity) and alice.role == "user" and alice.groups == ("staff",)
    root = _identity(tmp_path, _claims(sub="root", groups=["appliance-admins"]), **policy)
    assert isinstance(root, Identity) and root.role == "admin" and root.role_groups == ("appliance-admins",)
    assert _identity(tmp_path, _claims(groups=["contractors"]), **policy) == "group"
    assert _identity(tmp_path, _claims(groups=None), **policy) == "group"
    assert _identity(tmp_path, _claims(groups="staff"), **policy) != "group"  # one group as a string
    domains = {"allowed_email_domains": ["Example.com"]}
    assert _identity(tmp_path, _claims(email_verified=True), **domains) != "email_domain"
    assert _identity(tmp_path, _claims(), **domains) == "email_unverified"
    assert _identity(tmp_path, _claims(), require_verified_email=False, **domains) != "email_unverified"
    for lookalike in ("a@example.com.evil.org", "a@sub.example.com", "example.com", "a@evilexample.com"):
        assert _identity(tmp_path, _claims(email=lookalike, email_verified=True), **domains) == "email_domain"
    assert _identity(tmp_path, _claims(sub="has/slash")) == "subject_unsupported"
    assert _identity(tmp_path, _claims(sub="a" * 256)) == "subject_unsupported"


def test_oidc_settings_refuse_what_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="https"):
        AuthSettings(oidc_issuer="http://idp.example.com")
    with pytest.raises(ValueError, match="client_id"):
        AuthSettings(oidc_issuer=ISSUER)
    off = AuthSettings()
    assert off.key_sign_in is True and not off.oidc_enabled
    on = _settings(tmp_path)
    assert on.key_sign_in is False and on.display_name == "idp.example.com"
    assert "client-secret" not in repr(on) and on.client_secret().startswith("client-secret")
