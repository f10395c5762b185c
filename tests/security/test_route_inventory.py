"""Every route of gateway, balancer, worker and RAG is public on purpose or protected.

The routes are enumerated from each service's own app factory (so a route added later is
checked without editing this file), then probed on the live processes: a route not on
the public list must answer 401 without credentials (and with a wrong one); a gateway
route must let a key with its declared scope past the scope check and answer 403, naming
that scope, to a key of every other scope, unless it is on the short "any valid key" list.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.figures import record_figures
from tests.support.stack import LoopbackAppliance

pytestmark = pytest.mark.integration

# Public on purpose; THREAT_MODEL.md says why for each.
GATEWAY_PUBLIC = {"/healthz", "/readyz", "/metrics",
                  # web sign-in: the flow itself, sign-out and "who am I" (their own checks: gateway/THREAT_MODEL.md)
                  "/auth/login", "/auth/callback", "/auth/logout", "/auth/me"}
GATEWAY_UI_PAGES = {"/", "/admin"}  # static HTML of the web UI; every call it makes needs a key
GATEWAY_PUBLIC_PREFIXES = ("/schema", "/static")  # OpenAPI document + viewers; web UI assets
GATEWAY_ANY_KEY = ("/v1/models",)  # any valid key may list and read models (filtered by the key's allowed models)
# The scope each protected gateway route declares (docs/CONTRACTS.md "Keys"); a route matching none is a failure.
DECLARED_SCOPES = (
    (re.compile(r"^/v1/(chat/)?completions$"), "chat"),
    (re.compile(r"^/v1/responses(/|$)"), "chat"),
    (re.compile(r"^/v1/(files|batches)(/|$)"), "chat"),  # the Batch API: its files and batches generate
    (re.compile(r"^/v1/embeddings$"), "embeddings"),
    (re.compile(r"^(/v1)?/(collections|jobs)(/|$)"), "collections"),
    (re.compile(r"^/admin/"), "admin"),
)
INTERNAL_PUBLIC = {"/health", "/metrics"}  # docs/CONTRACTS.md "Internal token"
SCOPES = ("chat", "embeddings", "collections", "admin")
PARAM_VALUES = {"key_id": "k-0", "path": "docs", "job_id": "job-0", "name": "docs", "document_id": "doc-0",
                "tail": "chat/completions"}


def concrete(path: str) -> str:
    """``/a/{name:str}/{tail:.*}`` → ``/a/docs/chat/completions``."""
    return re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: PARAM_VALUES.get(m.group(1), "x"), path)


def _empty_config(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp / "empty.toml").write_text("")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp / "empty.toml"))


def gateway_routes(tmp: Path) -> list[tuple[str, str]]:
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    app = create_app(GatewaySettings(internal_token="t" * 32, data_dir=tmp))
    return [(method, route.path) for route in app.routes for method in sorted(getattr(route, "methods", ()))
            if method not in ("OPTIONS", "HEAD")]


def aiohttp_routes(app: Any) -> list[tuple[str, str]]:
    routes = []
    for route in app.router.routes():
        method = "POST" if route.method == "*" else route.method
        if method != "HEAD":
            routes.append((method, route.resource.canonical))
    return routes


def internal_routes(tmp: Path) -> dict[str, list[tuple[str, str]]]:
    from balancer.app import create_app as balancer_app
    from balancer.settings import BalancerSettings
    from inference.app import create_app as worker_app
    from inference.settings import WorkerSettings
    from rag.app import create_app as rag_app
    from rag.settings import RagSettings

    common = {"internal_token": "t" * 32, "data_dir": tmp}
    return {
        "balancer": aiohttp_routes(balancer_app(BalancerSettings(**common))),  # type: ignore[arg-type]
        "worker": aiohttp_routes(worker_app(WorkerSettings(**common))),  # type: ignore[arg-type]
        "rag": aiohttp_routes(rag_app(RagSettings(**common))),  # type: ignore[arg-type]
    }


def probe(client: httpx.Client, method: str, url: str, headers: dict[str, str] | None = None) -> int:
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, url, content=body, headers={"Content-Type": "application/json",
                                                               **(headers or {})}).status_code


def test_every_internal_route_is_public_or_needs_the_token(security_stack: LoopbackAppliance, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _empty_config(tmp_path, monkeypatch)
    bases = {"balancer": security_stack.balancer, "worker": security_stack.workers[0], "rag": security_stack.rag}
    failures, checked = [], 0
    with httpx.Client(timeout=30) as client:
        for service, routes in internal_routes(tmp_path).items():
            assert routes, f"no routes enumerated for {service}"
            for method, path in routes:
                url = bases[service] + concrete(path)
                checked += 1
                if path in INTERNAL_PUBLIC:
                    continue
                for headers in (None, {"X-Internal-Token": "wrong-" + security_stack.token}):
                    status = probe(client, method, url, headers)
                    if status != 401:
                        failures.append(f"{service} {method} {path} with {headers}: {status}")
    record_figures("route_inventory_internal", routes_checked=checked, unprotected=len(failures))
    assert not failures, failures


def declared_scope(path: str) -> str | None:
    return next((scope for pattern, scope in DECLARED_SCOPES if pattern.match(path)), None)


def _scope_failures(client: httpx.Client, method: str, path: str, keys: dict[str, str]) -> list[str]:
    """Its own scope's key gets past the scope check; every other scope's key gets a 403 naming that scope."""
    scope = declared_scope(path)
    if scope is None:
        return [f"{method} {path}: no declared scope (add it to DECLARED_SCOPES)"]
    failures = []
    for holder, key in keys.items():
        response = client.request(method, concrete(path), content=b"{}" if method in ("POST", "PUT", "PATCH") else None,
                                  headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        if holder == scope:
            if response.status_code in (401, 403):
                failures.append(f"{method} {path}: its own scope {scope!r} got {response.status_code}")
        elif response.status_code != 403 or f"'{scope}' scope" not in response.text:
            failures.append(f"{method} {path} ({scope}): a {holder!r} key got {response.status_code}, want 403")
    return failures


def test_every_gateway_route_is_public_or_needs_key_and_scope(security_stack: LoopbackAppliance, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _empty_config(tmp_path, monkeypatch)
    routes = gateway_routes(tmp_path)
    assert ("POST", "/v1/chat/completions") in routes
    keys = {scope: security_stack.create_key(f"inventory-{scope}", (scope,)) for scope in SCOPES}
    failures, protected, public = [], 0, 0
    with httpx.Client(base_url=security_stack.gateway, timeout=30) as client:
        for method, path in routes:
            if path in GATEWAY_PUBLIC | GATEWAY_UI_PAGES or path.startswith(GATEWAY_PUBLIC_PREFIXES):
                public += 1
                continue
            protected += 1
            url = concrete(path)
            for headers in (None, {"Authorization": "Bearer sk-not-a-real-key"}, {"Authorization": "Basic eDp5"}):
                if (status := probe(client, method, url, headers)) != 401:
                    failures.append(f"{method} {path} with {headers}: {status}, want 401")
            if path.startswith(GATEWAY_ANY_KEY):
                statuses = {scope: probe(client, method, url, {"Authorization": f"Bearer {key}"})
                            for scope, key in keys.items()}
                failures += [f"{method} {path}: any valid key, but {statuses}" for s in statuses.values()
                             if s in (401, 403)][:1]
                continue
            failures += _scope_failures(client, method, path, keys)
    record_figures("route_inventory_gateway", routes=len(routes), protected=protected, public=public,
                   failures=len(failures))
    assert not failures, failures


def test_public_gateway_routes_leak_no_secret(security_stack: LoopbackAppliance) -> None:
    """The public pages carry no key material: neither the admin key nor the internal token."""
    with httpx.Client(base_url=security_stack.gateway, timeout=30) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/schema/openapi.json", *GATEWAY_UI_PAGES):
            response = client.get(path)
            assert response.status_code in (200, 404), (path, response.status_code)
            text = response.text
            assert security_stack.admin_key not in text, path
            assert security_stack.token not in text, path
