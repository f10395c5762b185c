"""A key revoked just before Redis dies is admitted for at most ``key_cache_ttl_s`` (THREAT_MODEL G12b).

Over HTTP: Redis, the gateway and the instant fake upstream, each its own process. The key is verified
(a 200), revoked through the admin API, then redis-server is SIGKILLed and the key keeps calling. The
bound is checked with the client's own clock and no threshold of its own: a 200 means the gateway
admitted the request after it was sent and within ``key_cache_ttl_s`` of its last verification, which
ended before the verifying response arrived; so every 200 was sent before ``verified_end + ttl``, and
every request sent after ``verified_start + ttl`` must be refused.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from appliance.bench.harness import wait_until
from tests.support.stack import LoopbackAppliance, appliance_stack, restart_redis

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

KEY_CACHE_TTL_S = 4.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("revocation"), upstream="fake",
                         gateway_settings={"key_cache_ttl_s": str(KEY_CACHE_TTL_S), "redis_timeout_s": "0.5",
                                           "rate_limit_fail_open": "true"}) as stack:
        yield stack


def _chat(api: httpx.Client, stack: LoopbackAppliance, key: str) -> int:
    body = {"model": stack.model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    return api.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}",
                                                                "Cache-Control": "no-store"}).status_code


def _revoke(admin: httpx.Client, name: str) -> None:
    key_id = next(k["id"] for k in admin.get("/admin/keys").json()["data"] if k["name"] == name)
    assert admin.delete(f"/admin/keys/{key_id}").status_code == 200


def test_a_revoked_key_is_admitted_at_most_key_cache_ttl_s_while_redis_is_down(stack: LoopbackAppliance) -> None:
    revoked_unseen = stack.create_key("revoked-unseen", ("chat",))
    revoked_seen = stack.create_key("revoked-seen", ("chat",))
    with httpx.Client(base_url=stack.gateway, timeout=30) as api, \
            httpx.Client(base_url=stack.gateway, timeout=30,
                         headers={"Authorization": f"Bearer {stack.admin_key}"}) as admin:
        assert _chat(api, stack, revoked_seen) == 200
        _revoke(admin, "revoked-seen")
        assert _chat(api, stack, revoked_seen) == 401  # seen revoked: its verified copy is dropped
        verified_start = time.monotonic()
        assert _chat(api, stack, revoked_unseen) == 200
        verified_end = time.monotonic()
        _revoke(admin, "revoked-unseen")  # this gateway never sees it revoked
        stack.services["redis"].signal(signal.SIGKILL)
        stack.services["redis"].proc.wait(10)
        calls: list[tuple[float, str, int]] = []
        while time.monotonic() < verified_start + KEY_CACHE_TTL_S + 2:
            for name, key in (("unseen", revoked_unseen), ("seen", revoked_seen)):
                sent = time.monotonic()
                calls.append((sent, name, _chat(api, stack, key)))
            time.sleep(0.1)
        restart_redis(stack)
        wait_until(lambda: admin.get("/admin/keys").status_code == 200, 30, "gateway back on Redis", interval=0.2)
        after = _chat(api, stack, revoked_unseen)

    admitted = [(sent - verified_end, name) for sent, name, status in calls if status == 200]
    late = [(sent - verified_start, name, status) for sent, name, status in calls
            if sent > verified_start + KEY_CACHE_TTL_S and status == 200]
    assert all(status in (200, 401, 503) for _, _, status in calls), calls
    assert not [a for a in admitted if a[1] == "seen"], "a key seen revoked must stay refused during the outage"
    assert admitted, "the verified copy must serve the key while Redis is down (else the bound is untested)"
    assert all(offset <= KEY_CACHE_TTL_S for offset, _ in admitted), admitted
    assert not late, late
    assert [s for sent, name, s in calls if name == "unseen" and sent > verified_start + KEY_CACHE_TTL_S], \
        "no request was sent after the bound"
    assert after == 401, "Redis back: the revocation is seen at once"

