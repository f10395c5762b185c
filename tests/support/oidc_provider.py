"""A real OpenID provider for tests: the certified ``oidc-provider`` npm package (pinned in ./scripts/test,
installed in .cache/npm), run by ``tests/support/oidc_provider.mjs`` with one confidential client and the
users given. ``sign_in_over_http`` walks its login form with httpx, as a browser would, for tests that need a
real ID token without a browser."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from tests.support.processes import REPO, Service, free_port, run_service

__all__ = ["NPM_PREFIX", "IdpUser", "OidcProvider", "installed", "oidc_provider", "sign_in_over_http"]

NPM_PREFIX = Path(os.environ.get("APPLIANCE_TEST_NPM_PREFIX", REPO / ".cache" / "npm"))
SCRIPT = Path(__file__).with_name("oidc_provider.mjs")
CLIENT_ID = "appliance-web"


@dataclass(frozen=True)
class IdpUser:
    username: str
    groups: tuple[str, ...]
    email: str = ""
    password: str = field(default_factory=lambda: "idp-password-" + secrets.token_hex(16))

    @property
    def sub(self) -> str:
        return f"sub-{self.username}"


@dataclass
class OidcProvider:
    issuer: str
    client_id: str
    client_secret: str
    secret_file: Path
    users: dict[str, IdpUser]
    service: Service

    def auth_settings(self, redirect_url: str, **extra: str) -> dict[str, str]:
        """``APPLIANCE_AUTH_*`` for a gateway that signs people in with this provider."""
        base = {"oidc_issuer": self.issuer, "client_id": self.client_id, "client_secret_file": str(self.secret_file),
                "redirect_url": redirect_url, "provider_name": "Test IdP", "scopes": "openid,email,profile,groups"}
        return {f"APPLIANCE_AUTH_{name.upper()}": value for name, value in {**base, **extra}.items()}


def installed() -> bool:
    package = NPM_PREFIX / "node_modules" / "oidc-provider" / "package.json"
    return shutil.which("node") is not None and package.is_file()


@contextmanager
def oidc_provider(tmp: Path, *, redirect_uris: Sequence[str], users: Sequence[IdpUser],
                  id_token_ttl_s: int = 600) -> Iterator[OidcProvider]:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    secret = "oidc-test-client-secret-" + secrets.token_hex(16)
    tmp.mkdir(parents=True, exist_ok=True)
    secret_file = tmp / "oidc_client_secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    config = {
        "port": port, "issuer": issuer, "id_token_ttl_s": id_token_ttl_s,
        "clients": [{"client_id": CLIENT_ID, "client_secret": secret, "redirect_uris": list(redirect_uris),
                     "response_types": ["code"], "grant_types": ["authorization_code"],
                     "token_endpoint_auth_method": "client_secret_basic"}],
        "users": [{"username": u.username, "password": u.password, "sub": u.sub, "name": u.username.title(),
                   "email": u.email or f"{u.username}@example.com", "groups": list(u.groups)} for u in users],
    }
    config_path = tmp / "oidc_provider.json"
    config_path.write_text(json.dumps(config))
    with run_service(["node", str(SCRIPT), str(config_path)], env={"APPLIANCE_TEST_NPM_PREFIX": str(NPM_PREFIX)},
                     log_path=tmp / "oidc_provider.log",
                     ready_url=f"{issuer}/.well-known/openid-configuration", ready_timeout=30) as running:
        yield OidcProvider(issuer, CLIENT_ID, secret, secret_file, {u.username: u for u in users}, running)


def sign_in_over_http(client: httpx.Client, authorization_url: str, user: IdpUser) -> httpx.URL:
    """Follow the provider's pages from ``authorization_url`` and submit ``user``'s form; the URL the provider
    finally redirects to (the client's redirect URI with ``code`` and ``state``), not followed."""
    response = client.get(authorization_url)
    while response.is_redirect and not _is_callback(response):
        response = client.get(urljoin(str(response.url), response.headers["location"]))
    action = re.search(r'action="([^"]+)"', response.text)
    assert action, response.text[:500]
    response = client.post(urljoin(str(response.url), action.group(1)),
                           data={"username": user.username, "password": user.password})
    while response.is_redirect and not _is_callback(response):
        response = client.get(urljoin(str(response.url), response.headers["location"]))
    assert _is_callback(response), (response.status_code, response.text[:500])
    return httpx.URL(response.headers["location"])


def _is_callback(response: httpx.Response) -> bool:
    location = response.headers.get("location", "") if response.is_redirect else ""
    return "code" in parse_qs(urlsplit(location).query) or "/auth/callback" in location
