"""Restarts of every service of the local runtime, not only workers, on one real stack (`appliance` CLI).

`appliance restart gateway | balancer | rag | redis` each returns with the service back (a new process,
healthy) and the stack answering a real chat completion at once (official ``openai`` client, no retry);
keys, usage and RAG documents survive (Redis persistence, the RAG index on disk). supervisord brings a
SIGKILLed balancer or RAG service back by itself. `appliance keys revoke` makes the key get 401 over HTTP,
and `appliance usage` shows exactly the tokens the answers reported in their ``usage`` field.

One stack for the module (one worker, no Prometheus); every wait is bounded by a configured timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from supervisor.xmlrpc import SupervisorTransport

from appliance.bench.harness import wait_until
from appliance.runtime.local.supervisor_conf import socket_path
from tests.support.supervised import SupervisedAppliance

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

READY_S = 180.0  # the runtime's ready_timeout_s: how long `up` itself waits for a service
SAMPLED: dict[str, Any] = {"temperature": 0.7, "extra_headers": {"Cache-Control": "no-cache"}}  # reaches the worker
DOCUMENT = "Visitors to the lighthouse must sign the blue ledger kept by the keeper."


class Ledger:
    """A key and the usage its answers reported, to be compared with what `appliance usage` shows."""

    def __init__(self, secret: str, key_id: str) -> None:
        self.secret, self.key_id = secret, key_id
        self.expected = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def add(self, usage: Any = None) -> None:
        """One more request; a chat's tokens (collection requests count with none)."""
        self.expected["requests"] += 1
        if usage is None:
            return
        assert usage.completion_tokens > 0, usage
        self.expected["prompt_tokens"] += usage.prompt_tokens
        self.expected["completion_tokens"] += usage.completion_tokens


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[SupervisedAppliance]:
    data_dir = tmp_path_factory.mktemp("restarts") / "data"
    (data_dir / "models").mkdir(parents=True)
    shutil.copy(model_path, data_dir / "models" / model_path.name)
    stack = SupervisedAppliance(data_dir, env={"APPLIANCE_RUNTIME_WITH_PROMETHEUS": "false"})
    try:
        stack.cli("up", "--workers", "1", "--slots", "2")
        yield stack
    finally:
        stack.cli("down", check=False, timeout=400)


@pytest.fixture(scope="module")
def alice(stack: SupervisedAppliance) -> Ledger:
    created = json.loads(stack.cli("keys", "create", "alice", "--scopes", "chat,collections", "--json").stdout)
    return Ledger(created["key"], created["id"])


def _chat(stack: SupervisedAppliance, ledger: Ledger, stream: bool = False) -> None:
    """One real chat completion, no retry: it must answer now."""
    request: dict[str, Any] = {
        "model": "gemma-3-270m",
        "max_tokens": 4,
        **SAMPLED,
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    with stack.openai(ledger.secret) as client:
        try:
            if stream:
                chunks = list(
                    client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
                )
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                usage = chunks[-1].usage
            else:
                reply = client.chat.completions.create(**request)
                assert reply.choices[0].message.content
                usage = reply.usage
        except openai.InternalServerError:
            ledger.add()  # admitted, then failed upstream: the gateway counts it, with no tokens
            raise
    assert usage is not None
    ledger.add(usage)


def _usage(stack: SupervisedAppliance, key_id: str, cli: bool = False) -> dict[str, int]:
    """The key's usage today and yesterday (UTC: a run may cross midnight): `appliance usage --json`, or the
    admin API it calls (cheaper to poll).

    Either must answer at once: a 503 after a restart is a failure, not something to wait out."""
    if cli:
        rows = json.loads(stack.cli("usage", "--json", "--days", "2").stdout)["data"]
    else:
        reply = httpx.get(
            f"{stack.gateway}/admin/usage",
            timeout=30,
            params={"key_id": key_id, "days": 2},
            headers={"Authorization": f"Bearer {stack.admin_key()}"},
        )
        assert reply.status_code == 200, reply.text
        rows = reply.json()["data"]
    mine = [row for row in rows if row["key_id"] == key_id]
    return {m: sum(int(row[m]) for row in mine) for m in ("requests", "prompt_tokens", "completion_tokens")}


def _settled(stack: SupervisedAppliance, ledger: Ledger, cli: bool = False) -> None:
    """Usage is settled just after each answer is sent: wait until all of it is counted (then, with ``cli``,
    `appliance usage` must show exactly what the answers reported)."""
    shown: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while (shown := _usage(stack, ledger.key_id)) != ledger.expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"usage shows {shown}, the answers reported {ledger.expected}")
        time.sleep(0.2)
    assert not cli or _usage(stack, ledger.key_id, cli=True) == ledger.expected


def _supervised(stack: SupervisedAppliance, name: str) -> tuple[str, int]:
    """The service's state and pid as supervisord has them (its own socket: cheaper than a CLI run)."""
    transport = SupervisorTransport(None, None, f"unix://{socket_path(stack.data_dir / 'run')}")
    with xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport) as supervisord:  # closes its socket
        info: dict[str, Any] = supervisord.supervisor.getProcessInfo(name)  # type: ignore[assignment]
    return str(info["statename"]), int(info["pid"])


def _healthy_with_new_pid(stack: SupervisedAppliance, name: str, old_pid: int) -> None:
    """`appliance status --json`: the whole stack healthy, the service in a new process."""
    code, report = stack.status()
    service = next(s for s in report["services"] if s["name"] == name)
    assert code == 0 and service["healthy"] and service["pid"] not in (None, old_pid), (old_pid, report)


def _search(stack: SupervisedAppliance, ledger: Ledger, retry: bool = False) -> list[str]:
    """The document ids a RAG search finds; with ``retry``, an unavailable RAG service finds none."""
    response = httpx.post(
        f"{stack.gateway}/v1/collections/restarts/search",
        timeout=60,
        headers={"Authorization": f"Bearer {ledger.secret}"},
        json={"query": "Who keeps the blue ledger?", "top_k": 3},
    )
    if response.status_code == 200 or response.status_code >= 500:
        ledger.add()  # admitted: counted by the gateway even when the service behind it failed
    if retry and response.status_code == 503:
        return []
    assert response.status_code == 200, response.text
    return [hit["document_id"] for hit in response.json()["results"]]


def test_usage_shows_the_tokens_the_answers_reported(stack: SupervisedAppliance, alice: Ledger) -> None:
    _chat(stack, alice)
    _chat(stack, alice, stream=True)
    _settled(stack, alice, cli=True)
    table = stack.cli("usage").stdout  # the human table names the key and its numbers too
    assert "alice" in table and str(alice.expected["completion_tokens"]) in table, table


@pytest.mark.parametrize("name", ["gateway", "balancer", "rag", "redis"])
def test_restart_brings_the_service_back_and_the_stack_answers(
    stack: SupervisedAppliance, alice: Ledger, name: str
) -> None:
    documents: list[str] = []
    if name == "rag":  # a document indexed before the restart is found after it
        headers = {"Authorization": f"Bearer {alice.secret}"}
        created = httpx.post(f"{stack.gateway}/v1/collections", json={"name": "restarts"}, headers=headers, timeout=60)
        assert created.status_code in (200, 201), created.text
        alice.add()
        doc = httpx.post(
            f"{stack.gateway}/v1/collections/restarts/documents",
            headers=headers,
            timeout=120,
            json={"title": "Lighthouse rules", "text": DOCUMENT},
        )
        assert doc.status_code in (200, 201), doc.text
        alice.add()
        documents = _search(stack, alice)
        assert documents
    if name == "redis":  # what Redis holds now must be there after it restarts
        _settled(stack, alice)
        keys_before = json.loads(stack.cli("keys", "list", "--json").stdout)
    _, old_pid = _supervised(stack, name)

    started = time.monotonic()
    stack.cli("restart", name, timeout=READY_S + 120)
    print(f"appliance restart {name}: {time.monotonic() - started:.1f}s (load average {os.getloadavg()[0]:.1f})")

    # At once, no retry: `restart` returns when the service serves again. What needs it is asked first.
    if name == "rag":
        assert _search(stack, alice) == documents  # the index on disk came back with the service
    if name == "redis":  # the admin API reads Redis directly (a chat is admitted from the key cache without it)
        assert _usage(stack, alice.key_id) == alice.expected  # the counters from before the restart
        assert json.loads(stack.cli("keys", "list", "--json").stdout) == keys_before
    _chat(stack, alice)
    _healthy_with_new_pid(stack, name, old_pid)
    if name == "redis":
        _chat(stack, alice, stream=True)
    # what it served is counted (after `restart redis`: on top of what was counted before)
    _settled(stack, alice, cli=name == "redis")


@pytest.mark.parametrize("name", ["balancer", "rag"])
def test_supervisord_restarts_a_killed_service(stack: SupervisedAppliance, alice: Ledger, name: str) -> None:
    state, old_pid = _supervised(stack, name)
    assert state == "RUNNING"
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> bool:
        state, pid = _supervised(stack, name)
        return state == "RUNNING" and pid != old_pid

    took = wait_until(restarted, READY_S, f"{name} restarted by supervisord", interval=0.2)
    print(f"SIGKILLed {name} running again after {took:.1f}s")

    def answers() -> bool:
        try:
            _chat(stack, alice)
        except (openai.InternalServerError, openai.APIConnectionError):
            return False
        return True

    wait_until(answers, READY_S, "the stack answering again", interval=0.5)
    if name == "rag":  # the restarted service answers too (the chat does not need it)
        wait_until(lambda: _search(stack, alice, retry=True) != [], READY_S, "RAG search answering again", interval=0.5)
    _healthy_with_new_pid(stack, name, old_pid)


def test_revoked_key_gets_401(stack: SupervisedAppliance) -> None:
    created = json.loads(stack.cli("keys", "create", "bob", "--json").stdout)
    bob = Ledger(created["key"], created["id"])
    _chat(stack, bob)  # works before

    stack.cli("keys", "revoke", bob.key_id)

    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    refused = httpx.post(
        f"{stack.gateway}/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {bob.secret}"}
    )
    assert refused.status_code == 401, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["message"]) == (
        "authentication_error",
        "invalid_api_key",
        "API key revoked.",
    ), error
    with pytest.raises(openai.AuthenticationError):
        _chat(stack, bob)
    listed = {row["id"]: row for row in json.loads(stack.cli("keys", "list", "--json").stdout)}
    assert listed[bob.key_id]["revoked"] is True


def test_usage_after_every_restart_is_what_the_answers_reported(stack: SupervisedAppliance, alice: Ledger) -> None:
    _settled(stack, alice, cli=True)
