"""Supply chain: a hostile chat template cannot run code; an unlisted model hash is refused.

A GGUF's ``tokenizer.chat_template`` and the ``chat_template`` setting reach the same
renderer (``inference.service`` → ``ChatTemplate(source)``). Known server-side template
injection payloads (CVE-2024-34359 and friends) are rendered by it, in-process and in a
real worker process, and from a real GGUF file whose metadata carries the payload;
each must fail closed (a 400 for the request), leave no side effect on disk, and
leave the worker serving.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from appliance.core.errors import APIError
from appliance.core.model_files import sha256_file
from appliance.core.wire import ChatMessage
from inference.model import ModelRefused, load_model
from inference.settings import WorkerSettings
from inference.templates import ChatTemplate
from tests.support.figures import record_figures
from tests.support.gguf_meta import read_string_metadata, write_with_string_metadata
from tests.support.processes import free_port, python_module, run_service

MARKER = "/tmp/appliance-ssti-{tag}"
TOKEN = "supply-chain-test-token-padded-to-32"  # the workers refuse a token under 32 characters
PAYLOADS = {
    "cve-2024-34359": "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch " + MARKER + "') }}",
    "cycler-globals": "{{ cycler.__init__.__globals__.os.system('touch " + MARKER + "') }}",
    "joiner-globals": "{{ joiner.__init__.__globals__.os.popen('touch " + MARKER + "').read() }}",
    "lipsum-globals": "{{ lipsum.__globals__['os'].popen('touch " + MARKER + "').read() }}",
    "subclasses": "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
                  "{{ c(['touch', '" + MARKER + "']) }}{% endif %}{% endfor %}",
    "attr-filter": "{{ ()|attr('__class__')|attr('__base__')|attr('__subclasses__')() }}",
    "format-escape": "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "namespace-globals": "{{ namespace.__init__.__globals__.os.system('touch " + MARKER + "') }}",
    "raise-exception-globals": "{{ raise_exception.__globals__['os'].system('touch " + MARKER + "') }}",
    "strftime-globals": "{{ strftime_now.__globals__['os'].system('touch " + MARKER + "') }}",
}
MESSAGES = [ChatMessage(role="user", content="hello")]


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_template_payload_cannot_execute(name: str) -> None:
    marker = Path(MARKER.format(tag=name))
    marker.unlink(missing_ok=True)
    source = PAYLOADS[name].replace("{tag}", name)
    try:
        rendered = ChatTemplate(source).render(MESSAGES).text
    except APIError as exc:
        assert exc.status == 400
        rendered = ""
    assert not marker.exists(), f"{name} ran code"
    for leak in ("<module", "<function", "<built-in", "<class", "__builtins__"):
        assert leak not in rendered, (leak, rendered[:300])


@pytest.mark.integration
def test_worker_with_hostile_template_refuses_and_keeps_serving(model_path: Path, tmp_path: Path) -> None:
    marker = Path(MARKER.format(tag="worker"))
    marker.unlink(missing_ok=True)
    port = free_port()
    (tmp_path / "empty.toml").write_text("")
    env = {"APPLIANCE_CONFIG": str(tmp_path / "empty.toml"), "APPLIANCE_DATA_DIR": str(tmp_path),
           "APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_WORKER_PORT": str(port),
           "APPLIANCE_WORKER_MODEL_PATH": str(model_path), "APPLIANCE_WORKER_N_THREADS": "1",
           "APPLIANCE_WORKER_SLOTS": "1", "APPLIANCE_WORKER_N_CTX": "256",
           "APPLIANCE_WORKER_CHAT_TEMPLATE": PAYLOADS["cve-2024-34359"].replace("{tag}", "worker")}
    url = f"http://127.0.0.1:{port}"
    with run_service(python_module("inference"), env=env, log_path=tmp_path / "worker.log",
                     ready_url=f"{url}/health", ready_timeout=120):
        headers = {"X-Internal-Token": TOKEN}
        chat = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60, json={
            "model": "gemma-3-270m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        health = httpx.get(f"{url}/health", timeout=10)
    record_figures("supply_chain_template", payloads=len(PAYLOADS), worker_status=chat.status_code,
                   marker_created=marker.exists())
    assert chat.status_code == 400, chat.text
    assert not marker.exists()
    assert health.status_code == 200


def test_unlisted_model_hash_is_refused(model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "empty.toml"))
    settings = WorkerSettings(model_path=str(model_path), data_dir=tmp_path, allowed_sha256=["0" * 64])
    with pytest.raises(ModelRefused, match="not in allowed_sha256"):
        load_model(settings)


@pytest.mark.integration
def test_worker_process_with_unlisted_hash_never_serves(model_path: Path, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "empty.toml").write_text("")
    env = {**os.environ, "APPLIANCE_CONFIG": str(tmp_path / "empty.toml"), "APPLIANCE_DATA_DIR": str(tmp_path),
           "APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_WORKER_PORT": str(port),
           "APPLIANCE_WORKER_MODEL_PATH": str(model_path),
           "APPLIANCE_WORKER_ALLOWED_SHA256": "1" * 64 + "," + "2" * 64}
    assert sha256_file(model_path) not in env["APPLIANCE_WORKER_ALLOWED_SHA256"]
    with run_service([sys.executable, "-m", "inference"], env=env, log_path=tmp_path / "worker.log",
                     ready_url=None) as service:
        statuses = []
        for _ in range(40):
            if service.proc.poll() is not None:
                break
            try:
                statuses.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code)
            except httpx.HTTPError:
                statuses.append(0)
            if statuses[-1] == 503 and "allowed_sha256" in service.logs():
                break
            time.sleep(0.25)
        log = service.logs()
    assert 200 not in statuses, "a worker with an unlisted model hash served /health 200"
    assert "allowed_sha256" in log, log[-2000:]


GGUF_PAYLOADS = {
    "gguf-cycler-popen": "{{ cycler.__init__.__globals__.os.popen('touch " + MARKER + "').read() }}",
    "gguf-subclasses": "{% for c in ().__class__.__base__.__subclasses__() %}{% if c.__name__ == 'Popen' %}"
                       "{{ c(['touch', '" + MARKER + "']) }}{% endif %}{% endfor %}",
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(GGUF_PAYLOADS))
def test_gguf_carrying_a_hostile_template_cannot_run_it(model_path: Path, tmp_path: Path, name: str) -> None:
    """A real model file whose tokenizer.chat_template is a payload: the worker loads it, refuses to render it."""
    marker = Path(MARKER.format(tag=name))
    marker.unlink(missing_ok=True)
    hostile = tmp_path / "hostile.gguf"
    payload = GGUF_PAYLOADS[name].replace("{tag}", name)
    write_with_string_metadata(model_path, hostile, {"tokenizer.chat_template": payload})
    assert read_string_metadata(hostile, "tokenizer.chat_template") == payload
    port = free_port()
    (tmp_path / "empty.toml").write_text("")
    env = {"APPLIANCE_CONFIG": str(tmp_path / "empty.toml"), "APPLIANCE_DATA_DIR": str(tmp_path),
           "APPLIANCE_INTERNAL_TOKEN": TOKEN, "APPLIANCE_WORKER_PORT": str(port),
           "APPLIANCE_WORKER_MODEL_PATH": str(hostile), "APPLIANCE_WORKER_N_THREADS": "1",
           "APPLIANCE_WORKER_SLOTS": "1", "APPLIANCE_WORKER_N_CTX": "256",
           # The operator allow-listed this exact file: the hash check passes, the sandbox must still hold.
           "APPLIANCE_WORKER_ALLOWED_SHA256": sha256_file(hostile)}
    url, headers = f"http://127.0.0.1:{port}", {"X-Internal-Token": TOKEN}
    with run_service(python_module("inference"), env=env, log_path=tmp_path / "worker.log",
                     ready_url=f"{url}/health", ready_timeout=120) as service:
        chat = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60, json={
            "model": "gemma-3-270m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        completion = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60, json={
            "model": "gemma-3-270m", "max_tokens": 2, "prompt": "hi"})
        health = httpx.get(f"{url}/health", timeout=10)
        alive = service.proc.poll() is None
    assert health.status_code == 200 and health.json()["model_sha256"] == sha256_file(hostile)
    assert chat.status_code == 400, chat.text
    assert "chat template" in chat.json()["error"]["message"]  # the GGUF's own template was the one rendered
    assert completion.status_code == 200 and alive  # the worker keeps serving
    assert not marker.exists(), f"{name} ran code"
