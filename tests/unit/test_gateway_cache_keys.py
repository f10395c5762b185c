"""Cache policy and canonical keys; key records and their public view."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from appliance.core.wire import ChatCompletionRequest
from gateway.cache import cache_key, cache_policy
from gateway.catalog import model_hashes
from gateway.keys import Principal, generate_secret, hash_secret, public_view

BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({**BASE, **fields})


def test_only_deterministic_requests_are_cached_by_default() -> None:
    assert cache_policy(chat(), {}, True, 60).active
    assert cache_policy(chat(temperature=0.7, seed=1), {}, True, 60).active
    assert not cache_policy(chat(temperature=0.7), {}, True, 60).active
    assert cache_policy(chat(temperature=0.7), {"x-cache": "force"}, True, 60).active
    assert not cache_policy(chat(), {}, False, 60).active


def test_cache_control_and_ttl_headers() -> None:
    policy = cache_policy(chat(), {"cache-control": "no-cache", "x-cache-ttl": "30"}, True, 60)
    assert (policy.lookup, policy.store, policy.ttl_s) == (False, True, 30)
    policy = cache_policy(chat(), {"cache-control": "No-Store"}, True, 60)
    assert (policy.lookup, policy.store, policy.ttl_s) == (True, False, 60)


def test_key_ignores_defaults_and_field_order_but_not_what_changes_the_answer() -> None:
    base = cache_key("chat", chat(), "sha")
    assert base == cache_key("chat", ChatCompletionRequest.model_validate(
        {"temperature": 0, "top_p": 1.0, "messages": BASE["messages"], "model": "m", "user": "someone"}), "sha")
    different = [
        cache_key("chat", chat(), "other-sha"), cache_key("completions", chat(), "sha"),
        cache_key("chat", chat(stream=True), "sha"), cache_key("chat", chat(max_tokens=5), "sha"),
        cache_key("chat", chat(seed=3), "sha"), cache_key("chat", chat(stop=["x"]), "sha"),
        cache_key("chat", chat(messages=[{"role": "user", "content": "hi!"}]), "sha"),
        cache_key("chat", chat(response_format={"type": "json_object"}), "sha"),
        cache_key("chat", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "sha"),
    ]
    assert len({base, *different}) == len(different) + 1


def test_model_hashes_come_from_the_balancers_model_list_alone() -> None:
    document = {"object": "list", "data": [{"id": "a", "model_sha256": "1" * 64}, {"id": "c"},
                                           {"id": "d", "sha256": "2" * 64, "health": {"model_sha256": "3" * 64}}]}
    assert model_hashes(document) == {"a": "1" * 64}  # only the published field, only where published
    assert model_hashes({"data": "nonsense"}) == {} == model_hashes(None)


@given(st.text(min_size=1, max_size=50), st.text(min_size=1, max_size=50))
def test_hash_is_stable_and_tells_secrets_apart(secret: str, other: str) -> None:
    assert hash_secret(secret) == hash_secret(secret) and len(hash_secret(secret)) == 64
    assert (hash_secret(secret) == hash_secret(other)) == (secret == other)


def test_generated_keys_are_long_and_unique() -> None:
    keys = {generate_secret() for _ in range(200)}
    assert len(keys) == 200 and all(k.startswith("sk-app-") and len(k) >= 40 for k in keys)


def test_principal_and_public_view_never_carry_the_secret() -> None:
    record = {"id": "key_1", "name": "n", "hint": "sk-app-…abcd", "scopes": "chat,admin", "models": "",
              "rpm": "5", "tpm": "0", "tpd": "0", "max_concurrent": "2", "created_at": "1.0",
              "expires_at": "0.000", "revoked": "0"}
    principal = Principal.from_record("d" * 64, record)
    assert principal.scopes == {"chat", "admin"} and principal.limits.rpm == 5
    assert principal.allows_model("anything") and not principal.expired(10**12)
    view = public_view(record)
    assert view["expires_at"] is None and view["limits"]["max_concurrent"] == 2
    assert "digest" not in view and "key" not in view
