"""Cross-tenant isolation, tried as an attacker would: key B against key A's private collection.

Key A owns a private collection holding a canary document (text, title and metadata of its own).
Key B, with the same scopes, sends A's collection name, A's document id and A's job id raw and in
many encodings (percent escapes of control characters and separators, ``?``, ``#``, ``/``, ``..``,
whitespace, case, Unicode lookalikes and other normalisation forms, double escapes) through every
route that takes a name: the REST collections, documents, search, upload and job routes (the chat
web UI calls exactly these), and chat's ``rag`` option. B must never see A's canary, title,
metadata or document count, and never change A's data; nothing answers 5xx. Hypothesis draws the
names; the finding that opened issue 32 (``payroll%0A``, ``"payroll\\n"``) is pinned as an example.

The stack is ``rag_stack`` (real Redis, the real RAG service, a real gateway, the fake balancer that
records every body it is sent).
"""

from __future__ import annotations

import json
import socket
import unicodedata
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.stack import FAKE_MODEL, LoopbackAppliance

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Cyrillic and Greek letters that look like Latin ones.
LOOKALIKES = {"a": "\u0430", "c": "\u0441", "e": "\u0435", "o": "\u043e", "p": "\u0440", "x": "\u0445",
              "y": "\u0443", "i": "\u0456", "s": "\u0455", "k": "\u03ba"}
SUFFIXES = ("%0A", "%0D", "%0D%0A", "%00", "%09", "%0B", "%0C", "%20", "%C2%85", "%E2%80%A8", "%E2%80%8B",
            "%EF%BB%BF", "%2F", "%2Fx", "%3F", "%3Fq%3D1", "%23", "%23frag", "%5C", "%3B", ";x", "%25", "%250A",
            "%2E", "%2E%2E", "%CC%81", "+", "%7F", "%1B")
PREFIXES = ("%20", "%0A", "..%2F", "x%2F..%2F", "%2E%2E%2F", ".%2F")


@dataclass(frozen=True)
class Tenant:
    key: str
    collection: str
    document_id: str
    job_id: str
    canaries: tuple[str, ...]  # text, title, metadata value: none may ever reach key B


def segment_variants(name: str) -> list[str]:
    """``name`` as raw path segments an attacker might send: each decodes to something other than ``name``
    (or to ``name`` itself, fully escaped, which must then be checked as ``name``)."""
    variants = [name, "".join(f"%{ord(c):02X}" for c in name), name.upper(), name[:1].upper() + name[1:]]
    variants += [name + suffix for suffix in SUFFIXES] + [prefix + name for prefix in PREFIXES]
    lookalike = "".join(LOOKALIKES.get(c, c) for c in name)
    if lookalike != name:
        variants.append(quote(lookalike, safe=""))
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in name)
    variants.append(quote(fullwidth, safe=""))
    for form in ("NFD", "NFKD"):
        decomposed = unicodedata.normalize(form, name + "\u00e9")
        variants.append(quote(decomposed, safe=""))
    return variants


def json_variants(name: str) -> list[str]:
    """The same, as a JSON string (chat's ``rag.collection``): what each path variant decodes to, and more."""
    decoded = {unquote(v) for v in segment_variants(name)}
    return sorted(decoded | {name + "\n", name + "\r\n", name + "\x00", " " + name, name + " ", name + "/",
                             name + "/../" + name, "../" + name, name + "\u2028", name + "\ufeff"})


def raw_request(base: str, method: str, target: str, key: str, body: bytes = b"", *,
                auth: str = "Authorization: Bearer") -> tuple[int, bytes]:
    """One HTTP/1.1 request with the request-target sent byte for byte (no client normalises it); ``auth`` is
    the header the secret goes in (``X-Internal-Token:`` for an internal service)."""
    url = urlsplit(base)
    head = (f"{method} {target} HTTP/1.1\r\nHost: {url.netloc}\r\n{auth} {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=30) as sock:
        sock.sendall(head.encode("latin-1") + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0
    return status, response


def _api(stack: LoopbackAppliance, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.gateway, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _last_upstream_body(stack: LoopbackAppliance) -> str:
    with urllib.request.urlopen(f"{stack.balancer}/_last", timeout=10) as response:
        return response.read().decode("utf-8", "replace")


def make_tenant(stack: LoopbackAppliance, key: str, collection: str) -> Tenant:
    token = collection.replace("-", "").replace("_", "")[:12]
    canaries = (f"canary-text-{token}-7f3a", f"canary-title-{token}-91c2", f"canary-meta-{token}-c0de")
    with _api(stack, key) as api:
        created = api.post("/v1/collections", json={"name": collection})
        assert created.status_code in (201, 409), created.text
        doc = api.post(f"/v1/collections/{collection}/documents", json={
            "title": canaries[1], "metadata": {"owner_note": canaries[2]},
            "text": f"The payroll budget for next year is 4.2 million euros. {canaries[0]}."})
        assert doc.status_code in (200, 201), doc.text
        job = api.post(f"/v1/collections/{collection}/documents", params={"background": "true"},
                       json={"title": canaries[1], "text": f"A second note for the job. {canaries[0]}"})
        assert job.status_code == 202, job.text
    return Tenant(key, collection, doc.json()["id"], job.json()["job_id"], canaries)


def assert_no_leak(tenant: Tenant, status: int, body: bytes | str, what: str) -> None:
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    assert status < 500 or status == 503, f"{what}: {status} {text[:300]}"
    assert 400 <= status < 500 or status == 503, f"{what}: key B got {status}: {text[:300]}"
    leaked = [c for c in tenant.canaries if c in text]
    assert not leaked, f"{what}: key B saw {leaked}: {text[:300]}"


def attack_paths(tenant: Tenant) -> Iterator[tuple[str, str, bytes]]:
    """(method, raw target, body) of every collection route, for each encoding of the name and ids."""
    search = json.dumps({"query": "payroll budget next year", "top_k": 5}).encode()
    upload = json.dumps({"title": "B was here", "text": "Key B overwrote this collection."}).encode()
    for name in segment_variants(tenant.collection):
        base = f"/v1/collections/{name}"
        yield "GET", base, b""
        yield "GET", f"{base}/documents", b""
        yield "POST", f"{base}/search", search
        yield "GET", f"{base}/documents/{tenant.document_id}", b""
        yield "DELETE", f"{base}/documents/{tenant.document_id}", b""
        yield "POST", f"{base}/documents", upload
        yield "DELETE", base, b""
    for doc in segment_variants(tenant.document_id)[:16]:
        yield "GET", f"/v1/collections/{tenant.collection}/documents/{doc}", b""
    for job in [tenant.job_id, *(tenant.job_id + s for s in SUFFIXES), tenant.job_id.upper()]:
        yield "GET", f"/v1/jobs/{job}", b""


def assert_tenant_intact(stack: LoopbackAppliance, tenant: Tenant) -> None:
    with _api(stack, tenant.key) as api:
        found = api.post(f"/v1/collections/{tenant.collection}/search",
                         json={"query": "payroll budget next year", "top_k": 5})
        documents = api.get(f"/v1/collections/{tenant.collection}/documents").json()["documents"]
    assert found.status_code == 200 and tenant.canaries[0] in found.text, found.text[:300]
    titles = {d["title"] for d in documents}
    assert titles == {tenant.canaries[1]}, titles  # both of A's documents carry the title; B's upload never landed
    assert tenant.document_id in {d["id"] for d in documents}


def attack(stack: LoopbackAppliance, tenant: Tenant, intruder: str) -> int:
    sent = 0
    for method, target, body in attack_paths(tenant):
        status, response = raw_request(stack.gateway, method, target, intruder, body)
        assert_no_leak(tenant, status, response, f"{method} {target}")
        sent += 1
    with _api(stack, intruder) as api:
        for name in json_variants(tenant.collection):
            chat = api.post("/v1/chat/completions", json={
                "model": FAKE_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "payroll budget?"}],
                "rag": {"collection": name, "top_k": 5}})
            assert_no_leak(tenant, chat.status_code, chat.text, f"chat rag.collection={name!r}")
            upstream = _last_upstream_body(stack)
            assert not [c for c in tenant.canaries if c in upstream], f"chat {name!r} sent A's text upstream"
            sent += 1
        listing = api.get("/v1/collections")
        assert listing.status_code == 200
        assert not [c for c in listing.json()["collections"] if c["name"] == tenant.collection]
        assert_no_leak(tenant, 404, listing.text, "GET /v1/collections")
    return sent


@pytest.fixture(scope="module")
def keys(rag_stack: LoopbackAppliance) -> tuple[str, str]:
    return (rag_stack.create_key("tenant-a", ("chat", "collections")),
            rag_stack.create_key("tenant-b", ("chat", "collections")))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(name=st.from_regex(r"[a-z][a-z0-9_-]{1,24}", fullmatch=True))
@example(name="payroll")  # issue 32: "payroll%0A" and "payroll\n" read A's collection
def test_key_b_never_reads_or_changes_key_as_collection(rag_stack: LoopbackAppliance, keys: tuple[str, str],
                                                        name: str) -> None:
    a, b = keys
    tenant = make_tenant(rag_stack, a, name)
    sent = attack(rag_stack, tenant, b)
    assert sent > 300
    assert_tenant_intact(rag_stack, tenant)


def test_names_the_pattern_refuses_are_refused_by_the_rag_service_too(rag_stack: LoopbackAppliance) -> None:
    """The second line: the RAG service itself parses names with the same pattern, so a gateway bug could
    not make it trim ``payroll\\n`` into ``payroll``."""
    owner = rag_stack.create_key("rag-direct", ("chat", "collections"))
    make_tenant(rag_stack, owner, "direct-payroll")
    token = rag_stack.internal_headers()["X-Internal-Token"]
    for name in [v for v in segment_variants("direct-payroll") if unquote(v) != "direct-payroll"]:
        for method, target in (("POST", f"/collections/{name}/search"), ("GET", f"/collections/{name}/documents")):
            body = b'{"query": "payroll budget", "top_k": 3}' if method == "POST" else b""
            status, response = raw_request(rag_stack.rag, method, target, token, body, auth="X-Internal-Token:")
            assert status in (400, 404, 405), f"{method} {target}: {status} {response[:200]!r}"
            assert b"canary" not in response, f"{method} {target}: {response[:300]!r}"


def test_raw_control_characters_in_the_request_target_never_reach_a_collection(
        rag_stack: LoopbackAppliance, keys: tuple[str, str]) -> None:
    """Bytes no client should send (a raw LF, TAB or NUL in the path) get a 4xx from the HTTP server or the
    gateway, never A's documents."""
    a, b = keys
    tenant = make_tenant(rag_stack, a, "raw-bytes")
    for raw in ("\t", "\x00", "\x0b", "\x7f", "\x85"):
        target = f"/v1/collections/{tenant.collection}{raw}/search"
        try:
            status, response = raw_request(rag_stack.gateway, "POST", target, b,
                                           json.dumps({"query": "payroll", "top_k": 3}).encode())
        except ConnectionResetError:
            continue  # the HTTP server hung up on it: nothing was read either
        assert status == 0 or 400 <= status < 500, f"{target!r}: {status}"
        assert not [c for c in tenant.canaries if c.encode() in response], f"{target!r} leaked"


def test_lost_access_record_makes_a_collection_admin_only(rag_stack: LoopbackAppliance, keys: tuple[str, str]) -> None:
    """Ownership fails closed: with A's record gone (an AOF window, an interrupted restore) neither A nor B
    reads it; an admin still does, and only an admin can share it explicitly."""
    import redis

    a, b = keys
    tenant = make_tenant(rag_stack, a, "lost-record")
    with redis.Redis.from_url(rag_stack.redis_url) as client:
        client.hdel("appliance:collection_owners", tenant.collection)
    query = {"query": "payroll budget next year", "top_k": 5}
    for key in (a, b):
        with _api(rag_stack, key) as api:
            found = api.post(f"/v1/collections/{tenant.collection}/search", json=query)
            assert_no_leak(tenant, found.status_code, found.text, "search after the record was lost")
            refused = api.put(f"/admin/collections/{tenant.collection}/sharing", json={"shared": True})
            assert refused.status_code == 403, refused.text
            assert api.post("/v1/collections", json={"name": "shared-by-user", "shared": True}).status_code == 403
    with _api(rag_stack, rag_stack.admin_key) as admin:
        assert tenant.canaries[0] in admin.post(f"/v1/collections/{tenant.collection}/search", json=query).text
        shared = admin.put(f"/admin/collections/{tenant.collection}/sharing", json={"shared": True})
        assert shared.status_code == 200 and shared.json()["access"] == "shared", shared.text
        listed = {c["name"]: c for c in admin.get("/v1/collections").json()["collections"]}
        assert listed[tenant.collection]["access"] == "shared"
    with _api(rag_stack, b) as api:  # shared now: B reads and searches it, and still cannot change it
        assert tenant.canaries[0] in api.post(f"/v1/collections/{tenant.collection}/search", json=query).text
        assert api.delete(f"/v1/collections/{tenant.collection}").status_code == 404
        assert api.post(f"/v1/collections/{tenant.collection}/documents",
                        json={"text": "B's text"}).status_code == 404


def test_sharing_a_keys_collection_keeps_its_owner(rag_stack: LoopbackAppliance, keys: tuple[str, str]) -> None:
    """An admin shares A's collection: B reads it but cannot change it, A still can; unshared, it is A's again."""
    a, b = keys
    tenant = make_tenant(rag_stack, a, "shared-then-not")
    query = {"query": "payroll budget next year", "top_k": 5}
    with _api(rag_stack, rag_stack.admin_key) as admin:
        shared = admin.put(f"/admin/collections/{tenant.collection}/sharing", json={"shared": True})
        assert shared.status_code == 200 and shared.json()["access"] == "shared", shared.text
    with _api(rag_stack, b) as api:
        assert tenant.canaries[0] in api.post(f"/v1/collections/{tenant.collection}/search", json=query).text
        assert api.post(f"/v1/collections/{tenant.collection}/documents", json={"text": "B"}).status_code == 404
    with _api(rag_stack, a) as api:
        added = api.post(f"/v1/collections/{tenant.collection}/documents", json={"title": "A's own", "text": "more"})
        assert added.status_code == 201, added.text
    with _api(rag_stack, rag_stack.admin_key) as admin:
        back = admin.put(f"/admin/collections/{tenant.collection}/sharing", json={"shared": False})
        assert back.json()["access"] == "private", back.text
    with _api(rag_stack, b) as api:
        hidden = api.post(f"/v1/collections/{tenant.collection}/search", json=query)
        assert_no_leak(tenant, hidden.status_code, hidden.text, "search after unsharing")
    with _api(rag_stack, a) as api:
        assert tenant.canaries[0] in api.post(f"/v1/collections/{tenant.collection}/search", json=query).text


def test_admin_collections_are_admin_only_unless_shared(rag_stack: LoopbackAppliance, keys: tuple[str, str]) -> None:
    _, b = keys
    with _api(rag_stack, rag_stack.admin_key) as admin:
        assert admin.post("/v1/collections", json={"name": "admin-private"}).status_code == 201
        assert admin.post("/v1/collections", json={"name": "admin-shared", "shared": True}).status_code == 201
        for name in ("admin-private", "admin-shared"):
            assert admin.post(f"/v1/collections/{name}/documents",
                              json={"title": f"{name} doc", "text": f"canary-{name} handbook text"}).status_code == 201
    with _api(rag_stack, b) as api:
        hidden = api.post("/v1/collections/admin-private/search", json={"query": "handbook", "top_k": 3})
        seen = api.post("/v1/collections/admin-shared/search", json={"query": "handbook", "top_k": 3})
        names = {c["name"]: c["access"] for c in api.get("/v1/collections").json()["collections"]}
    assert hidden.status_code == 404 and "canary-admin-private" not in hidden.text
    assert seen.status_code == 200 and "canary-admin-shared" in seen.text
    assert "admin-private" not in names and names.get("admin-shared") == "shared"


def test_a_name_held_by_another_key_cannot_be_taken_over(rag_stack: LoopbackAppliance, keys: tuple[str, str]) -> None:
    a, b = keys
    tenant = make_tenant(rag_stack, a, "squatted")
    with _api(rag_stack, b) as api:
        again = api.post("/v1/collections", json={"name": tenant.collection})
        variant = api.post("/v1/collections", json={"name": tenant.collection + "\n"})
    assert again.status_code == 409 and variant.status_code == 400, (again.text, variant.text)
    assert_tenant_intact(rag_stack, tenant)
    with _api(rag_stack, a) as api:  # the owner's record still stands: A reads, B does not
        assert api.get(f"/v1/collections/{tenant.collection}").status_code == 200


def _padded_html(size: int, words: str) -> bytes:
    """An HTML document of ``size`` bytes that is mostly an inert comment (cheap to index)."""
    head = f"<html><body><p>{words}</p><!-- ".encode()
    tail = b" --></body></html>"
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_storage_allowance_is_per_key_and_refused_with_a_clear_413(rag_stack: LoopbackAppliance) -> None:
    """A key cannot fill the disk for everyone: past its allowance (``rag_max_bytes_per_key``, 64 KiB on this
    stack) its uploads get a 413 saying so, whether declared (Content-Length) or chunked; another key is
    unaffected, and an admin key has no allowance."""
    filler, other = (rag_stack.create_key(name, ("chat", "collections")) for name in ("filler", "bystander"))
    for key, name in ((filler, "filler-docs"), (other, "bystander-docs")):
        with _api(rag_stack, key) as api:
            assert api.post("/v1/collections", json={"name": name}).status_code == 201
            first = api.post(f"/v1/collections/{name}/documents",
                             files={"file": ("a.html", _padded_html(40_000, f"{name} first"), "text/html")})
            assert first.status_code == 201, first.text
    with _api(rag_stack, rag_stack.admin_key) as admin:  # a shared collection still counts against its owner
        assert admin.put("/admin/collections/filler-docs/sharing", json={"shared": True}).status_code == 200
    with _api(rag_stack, filler) as api:
        declared = api.post("/v1/collections/filler-docs/documents",
                            files={"file": ("b.html", _padded_html(40_000, "second"), "text/html")})

        def chunked() -> Iterator[bytes]:
            yield b'{"title": "chunked", "text": "'
            for _ in range(10):
                yield b"y" * 4096
            yield b'"}'

        streamed = api.post("/v1/collections/filler-docs/documents", content=chunked(),
                            headers={"Content-Type": "application/json"})
        documents = api.get("/v1/collections/filler-docs/documents").json()["documents"]
    for refused in (declared, streamed):
        assert refused.status_code == 413, refused.text
        assert "storage allowance" in refused.json()["error"]["message"]
    assert len(documents) == 1, documents
    with _api(rag_stack, other) as api:  # the bystander still has room for a small one
        assert api.post("/v1/collections/bystander-docs/documents",
                        json={"title": "small", "text": "still fine"}).status_code == 201
    with _api(rag_stack, rag_stack.admin_key) as admin:
        assert admin.post("/v1/collections", json={"name": "admin-big"}).status_code == 201
        for size in (40_000, 40_000):
            big = admin.post("/v1/collections/admin-big/documents",
                             files={"file": (f"{size}.html", _padded_html(size, f"admin {size}"), "text/html")})
            assert big.status_code in (200, 201), big.text


def test_upload_jobs_in_flight_are_capped_per_key(rag_stack: LoopbackAppliance) -> None:
    """``max_jobs_per_key`` (2 on this stack) queued or running upload jobs per key: the next is a 429 with
    Retry-After; a second key's job is still accepted."""
    busy, other = (rag_stack.create_key(name, ("chat", "collections")) for name in ("job-flood", "job-other"))
    text = " ".join(f"Paragraph {i} of the long report about budgets and quarterly plans." for i in range(300))
    for key, name in ((busy, "job-flood"), (other, "job-other")):
        with _api(rag_stack, key) as api:
            assert api.post("/v1/collections", json={"name": name}).status_code == 201
    with _api(rag_stack, busy) as api:
        answers = [api.post("/v1/collections/job-flood/documents", params={"background": "true"},
                            json={"title": f"report {i}", "text": f"{i} {text}"}) for i in range(3)]
    with _api(rag_stack, other) as api:
        bystander = api.post("/v1/collections/job-other/documents", params={"background": "true"},
                             json={"title": "report", "text": text})
    assert [a.status_code for a in answers] == [202, 202, 429], [a.text for a in answers]
    assert int(answers[2].headers["retry-after"]) >= 1 and "upload jobs" in answers[2].json()["error"]["message"]
    assert bystander.status_code == 202, bystander.text
