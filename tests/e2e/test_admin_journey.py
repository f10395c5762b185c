"""The admin's journey, done as the admin does it, on one real local stack shared by the steps:

own model named in appliance.toml (a second GGUF under its own alias) → `up --host 0.0.0.0 --tls` →
the CLI's keys/usage/status over HTTPS → 20+ s streams across `scale` and `restart inference` → the
same model after each → a refused single-worker rolling restart → the admin's own certificate.
A config mistake, on its own small stack, makes `up` fail fast naming the right variable.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.runtime.plan import lan_addresses
from tests.support.supervised import SupervisedAppliance

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

ALIAS = "team-model"


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[SupervisedAppliance]:
    """An admin's folder: appliance.toml naming a second GGUF (a copy of the bundled one) and its alias."""
    home = tmp_path_factory.mktemp("admin")
    models = home / "models"
    models.mkdir()
    shutil.copy(model_path, models / "team-model-q4.gguf")
    (home / "appliance.toml").write_text(
        f'[worker]\nmodel_path = "{models / "team-model-q4.gguf"}"\nmodel_alias = "{ALIAS}"\nslots = 2\n'
    )
    stack = SupervisedAppliance(home / "data", cwd=home)
    stack.env.pop("APPLIANCE_WORKER_SLOTS")  # the file says 2
    try:
        yield stack
    finally:
        stack.cli("down", check=False, timeout=400)


def _models(stack: SupervisedAppliance) -> list[str]:
    response = httpx.get(
        f"{stack.gateway}/v1/models",
        verify=stack.verify,
        timeout=30,
        headers={"Authorization": f"Bearer {stack.admin_key()}"},
    )
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"]]


class Stream:
    """One streamed completion long enough to outlast a scale or a restart, read on a thread."""

    def __init__(self, stack: SupervisedAppliance, max_tokens: int) -> None:
        self.events: list[str] = []
        self.error: str | None = None
        self.first = threading.Event()
        self.elapsed = 0.0
        # a completion (no chat-template stop strings) that generates max_tokens whatever the model says
        body = {
            "model": ALIAS,
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "ignore_eos": True,
            "prompt": "Once upon a time, in a lighthouse by the sea,",
        }
        self._args = (f"{stack.gateway}/v1/completions", body, stack.admin_key(), stack.verify)
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        url, body, key, verify = self._args
        started = time.monotonic()
        try:
            with httpx.stream(
                "POST",
                url,
                json=body,
                verify=verify,
                timeout=300,
                headers={"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"},
            ) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line.removeprefix("data: "))
                        self.first.set()
        except httpx.HTTPError as exc:
            self.error = repr(exc)
        finally:
            self.elapsed = time.monotonic() - started
            self.first.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def finish(self) -> list[dict[str, Any]]:
        self._thread.join(timeout=400)
        assert self.error is None, self.error
        assert self.events and self.events[-1] == "[DONE]", self.events[-3:]
        chunks = [json.loads(e) for e in self.events[:-1]]
        assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
        return chunks


def _tokens_lasting(stack: SupervisedAppliance, seconds: float) -> int:
    """How many tokens one stream generates in about ``seconds`` on this machine now (measured, not assumed)."""
    body = {"model": ALIAS, "prompt": "Once upon a time,", "max_tokens": 48, "ignore_eos": True, "temperature": 0.7}
    started = time.monotonic()
    reply = httpx.post(
        f"{stack.gateway}/v1/completions",
        json=body,
        verify=stack.verify,
        timeout=300,
        headers={"Authorization": f"Bearer {stack.admin_key()}", "Cache-Control": "no-cache"},
    )
    reply.raise_for_status()
    rate = reply.json()["usage"]["completion_tokens"] / (time.monotonic() - started)
    return max(64, min(1800, int(rate * seconds)))  # within the worker's per-slot context


def _text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0].get("text") or "" for c in chunks if c.get("choices"))


def test_own_model_on_the_lan_over_https(admin: SupervisedAppliance) -> None:
    up = admin.cli("up", "--workers", "2", "--host", "0.0.0.0", "--tls", "--json")
    info = json.loads(up.stdout)
    assert info["model"] == ALIAS and info["listen"] == f"0.0.0.0:{admin.port}"
    assert info["openai_base_url"].startswith("https://")
    lan = lan_addresses()
    assert info["lan_urls"] == [f"https://{address}:{admin.port}/" for address in lan]
    admin.gateway = f"https://127.0.0.1:{admin.port}"
    admin.verify = ssl.create_default_context(
        cafile=admin.data_dir / "tls" / "gateway.crt"
    )  # the certificate verifies: its names fit
    assert _models(admin) == [ALIAS]
    if lan:  # from the LAN: the gateway answers on the LAN address, with a certificate naming it
        reply = httpx.get(f"https://{lan[0]}:{admin.port}/healthz", verify=admin.verify, timeout=30)
        assert reply.status_code == 200
        # internal services stay on loopback
        worker_port = int(admin.env["APPLIANCE_RUNTIME_WORKER_BASE_PORT"])
        for port in (worker_port, int(admin.env["APPLIANCE_RUNTIME_BALANCER_PORT"])):
            with socket.socket() as probe:
                assert probe.connect_ex((lan[0], port)) != 0, port

    # The CLI's own verbs talk HTTPS to it (remembered from `up --tls`).
    created = json.loads(admin.cli("keys", "create", "bob", "--json").stdout)
    assert created["key"]
    assert "bob" in admin.cli("keys", "list").stdout
    assert admin.cli("usage").returncode == 0
    code, report = admin.status()
    assert code == 0, report
    assert {w["model"] for w in report["workers"]} == {ALIAS}
    assert all(w["slots_total"] == 2 and "gpu_layers" in w for w in report["workers"])
    assert report["cache_hit_rate"] is None or report["cache_hit_rate"] >= 0
    assert "layers on GPU" in admin.cli("status", check=False).stdout


def test_long_streams_survive_scale_and_restart(admin: SupervisedAppliance) -> None:
    tokens = _tokens_lasting(admin, 30)
    for verb in (("scale", "inference=3"), ("restart", "inference"), ("scale", "inference=2")):
        stream = Stream(admin, tokens)
        assert stream.first.wait(120) and stream.error is None
        assert stream.running  # still generating when the verb starts
        admin.cli(*verb)
        chunks = stream.finish()
        print(f"{' '.join(verb)}: stream of {len(chunks)} chunks over {stream.elapsed:.1f}s ended with [DONE]")
        assert len(_text(chunks)) > 0
        assert _models(admin) == [ALIAS]  # the model from appliance.toml, still
    code, report = admin.status()
    assert code == 0 and len(report["workers"]) == 2 and {w["model"] for w in report["workers"]} == {ALIAS}


def test_single_worker_rolling_restart_is_refused(admin: SupervisedAppliance) -> None:
    admin.cli("scale", "inference=1")
    refused = admin.cli("restart", "inference", check=False)
    assert refused.returncode != 0 and "only one inference worker" in refused.stderr
    assert _models(admin) == [ALIAS]
    admin.cli("scale", "inference=2")


def test_own_certificate(admin: SupervisedAppliance) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder = admin.cwd / "certs"
    folder.mkdir()
    cert, key = folder / "chat.crt", folder / "chat.key"
    subprocess.run(  # the admin's own certificate, for the name they publish
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=chat.example.lan",
            "-addext",
            "subjectAltName=DNS:chat.example.lan,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    up = json.loads(admin.cli("up", "--tls-cert", str(cert), "--tls-key", str(key), "--json").stdout)
    assert up["openai_base_url"].startswith("https://")
    admin.verify = ssl.create_default_context(cafile=cert)
    assert _models(admin) == [ALIAS]  # served with the admin's certificate, same model, same flags
    assert admin.cli("keys", "list").returncode == 0
    code, _ = admin.status()
    assert code == 0


def test_config_mistake_fails_fast_naming_the_variable(tmp_path: Path, model_path: Path) -> None:
    home = tmp_path / "admin"
    (home / "data" / "models").mkdir(parents=True)
    shutil.copy(model_path, home / "data" / "models" / model_path.name)  # the bundled model, already assembled
    stack = SupervisedAppliance(home / "data", cwd=home)
    timeout = 900
    toml = f"[runtime]\nwith_rag = false\nwith_prometheus = false\nready_timeout_s = {timeout}\n"
    # A shared field set in the balancer's table: the balancer exits 2 naming APPLIANCE_LOG_LEVEL.
    (home / "appliance.toml").write_text(toml + '[balancer]\nlog_level = "LOUD"\n')
    try:
        started = time.monotonic()
        failed = stack.cli("up", "--workers", "1", check=False, timeout=timeout)
        elapsed = time.monotonic() - started
        assert failed.returncode != 0
        assert "balancer refused its configuration" in failed.stderr, failed.stderr
        assert "env APPLIANCE_LOG_LEVEL " in failed.stderr and "APPLIANCE_BALANCER_LOG_LEVEL" not in failed.stderr
        assert elapsed < timeout / 3, elapsed  # reported at once, not after the readiness timeout
        print(f"config mistake reported in {elapsed:.1f}s (readiness timeout {timeout}s)")
        balancer = next(s for s in stack.status()[1]["services"] if s["name"] == "balancer")
        assert balancer["state"] in {"stopped", "exited", "fatal"} and balancer["restarts"] <= 4, balancer
    finally:
        stack.cli("down", check=False, timeout=120)
    # Mistakes the CLI can see (a shared field at the top level or in [worker]) stop it before anything starts.
    for text in ('log_level = "LOUD"\n', '[worker]\nlog_level = "LOUD"\n'):
        (home / "appliance.toml").write_text(text)
        refused = stack.cli("up", check=False, timeout=60)
        assert refused.returncode != 0 and "env APPLIANCE_LOG_LEVEL " in refused.stderr, refused.stderr


def test_upgrade_keeps_serving(admin: SupervisedAppliance) -> None:
    """`appliance upgrade` (workers, RAG, balancer, gateway) while clients chat and a long stream runs."""
    import openai

    from tests.support.chat_load import ChatLoad

    pids = {s["name"]: s["pid"] for s in admin.status()[1]["services"]}

    def client() -> openai.OpenAI:  # the SDK's default retries, as a client of the appliance has
        http = openai.DefaultHttpxClient(verify=admin.verify, timeout=120)
        return openai.OpenAI(base_url=f"{admin.gateway}/v1", api_key=admin.admin_key(), timeout=120, http_client=http)

    request: dict[str, Any] = {"model": ALIAS, "temperature": 0.7, "extra_headers": {"Cache-Control": "no-cache"}}
    with ChatLoad(client, clients=2, **request) as load:
        stream = Stream(admin, _tokens_lasting(admin, 30))
        assert stream.first.wait(120) and stream.running
        upgraded = admin.cli("upgrade")
        chunks = stream.finish()
    print(f"upgrade under load: {load.ok} ok, {len(load.failures)} failed; stream {stream.elapsed:.1f}s [DONE]")
    assert "Upgraded" in upgraded.stderr
    assert load.failures == [] and load.ok > 0 and chunks
    after = {s["name"]: s["pid"] for s in admin.status()[1]["services"]}
    for name in ("inference-1", "inference-2", "rag", "balancer", "gateway"):
        assert after[name] != pids[name], name  # every service runs new code
    assert "gateway-next" not in after and "balancer-next" not in after
    assert _models(admin) == [ALIAS]


def test_rotate_admin_key_and_logs(admin: SupervisedAppliance) -> None:
    old = admin.admin_key()
    admin.cli("rotate-admin-key")
    new = admin.admin_key()
    assert new != old
    assert oct((admin.data_dir / "admin_key").stat().st_mode & 0o777) == "0o600"
    listing = httpx.get(
        f"{admin.gateway}/admin/keys", verify=admin.verify, timeout=30, headers={"Authorization": f"Bearer {old}"}
    )
    assert listing.status_code == 401
    assert _models(admin) == [ALIAS]  # with the new key
    assert admin.cli("keys", "list").returncode == 0
    logs = admin.cli("logs", "gateway", "-n", "5")
    assert logs.stdout.strip()
    assert (admin.data_dir / "logs" / "supervisord.log").is_file()
    assert old not in (admin.data_dir / "logs" / "gateway.log").read_text()  # secrets never in logs
