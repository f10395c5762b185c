"""Codex CLI (``@openai/codex``) with the appliance as its model provider, real worker behind the gateway.

``codex exec`` on a tiny prompt, configured as a user would (a ``model_provider`` with ``wire_api =
"responses"``, the base URL in config.toml and the key from an environment variable), exits 0 with an answer
that reached it as a stream of Responses events. Between Codex and the gateway sits a loopback tap that passes
every byte through and keeps what went by, so the test sees the stream Codex parsed.

``./scripts/test`` installs the pinned Codex into ``.cache/npm`` (``APPLIANCE_TEST_CODEX``); without it this
test fails rather than skips. Codex's default prompt (~10k tokens: long instructions, a skills catalogue, a
multi-agent tool namespace) would not fit this small worker; the config trims it with Codex's own settings
(short instructions file, no skills/subagents/goals/web search), keeping its shell tools. Codex sends no
temperature, so the worker samples at 1.0, where the 270M model can ramble to the 2048-token cap (seen: a
path repeated until ``max_output_tokens``, Codex then exits 1 with "Incomplete response"); Codex's own
``--output-schema`` makes the answer a strict JSON schema (``text.format``) the worker constrains, so it ends
within a few tokens.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.stack import LoopbackAppliance

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
ANSWER_SCHEMA = {"type": "object", "properties": {"greeting": {"type": "string", "enum": ["hello", "hi"]}},
                 "required": ["greeting"], "additionalProperties": False}


@dataclass
class Exchange:
    """One request Codex made and what came back, as it went over the wire."""

    path: str
    request: dict[str, Any]
    status: int = 0
    content_type: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)


class ResponsesTap:
    """A loopback HTTP server that forwards each request to the gateway and streams the answer back unchanged,
    recording the request body and the SSE events of the answer."""

    def __init__(self, upstream: str) -> None:
        self.exchanges: list[Exchange] = []
        target = urlsplit(upstream)
        tap = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                exchange = Exchange(self.path, json.loads(raw or b"{}"))
                tap.exchanges.append(exchange)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")}
                upstream = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=600)
                try:
                    upstream.request("POST", self.path, body=raw, headers=headers)
                    reply = upstream.getresponse()
                    exchange.status, exchange.content_type = reply.status, reply.getheader("content-type") or ""
                    self.send_response(reply.status)
                    for name, value in reply.getheaders():
                        if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(name, value)
                    self.send_header("connection", "close")  # the body ends when the connection does
                    self.end_headers()
                    for line in iter(reply.readline, b""):
                        if line.startswith(b"data:") and exchange.content_type.startswith("text/event-stream"):
                            exchange.events.append(json.loads(line[5:]))
                        self.wfile.write(line)
                        self.wfile.flush()
                finally:
                    upstream.close()
                self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ResponsesTap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def codex() -> Path:
    path = Path(os.environ.get("APPLIANCE_TEST_CODEX") or REPO / ".cache/npm/node_modules/.bin/codex")
    if not path.exists():
        pytest.fail(f"Codex CLI not installed at {path}: ./scripts/test installs it "
                    "(npm install --prefix .cache/npm @openai/codex)")
    return path


@pytest.fixture(scope="module")
def stack(clients_stack: LoopbackAppliance) -> LoopbackAppliance:
    return clients_stack


@pytest.fixture(scope="module")
def key(new_chat_key: Callable[[str], str]) -> str:
    return new_chat_key("codex")


def _codex_home(home: Path, model: str, base_url: str) -> None:
    home.mkdir()
    (home / "instructions.md").write_text("You are a terse assistant. Answer in one short sentence.\n")
    (home / "config.toml").write_text(f"""\
model = "{model}"
model_provider = "appliance"
model_instructions_file = "{home / "instructions.md"}"
web_search = "disabled"

[agents]
enabled = false

[features]
goals = false

[skills]
include_instructions = false

[skills.bundled]
enabled = false

[model_providers.appliance]
name = "LLM appliance"
base_url = "{base_url}/v1"
env_key = "APPLIANCE_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
""")


def test_codex_exec_gets_a_streamed_answer_and_exits_0(codex: Path, stack: LoopbackAppliance, key: str,
                                                       tmp_path: Path) -> None:
    home, work = tmp_path / "codex-home", tmp_path / "work"
    work.mkdir()
    schema = tmp_path / "answer.schema.json"
    schema.write_text(json.dumps(ANSWER_SCHEMA))
    with ResponsesTap(stack.gateway) as tap:
        _codex_home(home, stack.model, tap.url)
        env = {**os.environ, "CODEX_HOME": str(home), "HOME": str(tmp_path), "APPLIANCE_API_KEY": key,
               "NO_COLOR": "1"}
        env.pop("OPENAI_API_KEY", None)
        done = subprocess.run([str(codex), "exec", "--skip-git-repo-check", "--ephemeral", "--json",
                               "--output-schema", str(schema), "Say hello in one word."],
                              cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=600, check=False)
    assert done.returncode == 0, f"codex exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    messages = [e["item"]["text"] for e in lines
                if e.get("type") == "item.completed" and e["item"].get("type") == "agent_message"]
    assert messages and json.loads(messages[-1])["greeting"] in ("hello", "hi"), done.stdout[-3000:]
    assert any(e.get("type") == "turn.completed" for e in lines), done.stdout[-3000:]

    assert tap.exchanges and all(x.path == "/v1/responses" for x in tap.exchanges)
    first = tap.exchanges[0].request
    assert first["stream"] is True and first["model"] == stack.model
    assert first["text"]["format"]["schema"] == ANSWER_SCHEMA
    assert {t["name"] for t in first["tools"] if t["type"] == "function"} >= {"exec_command"}
    last = tap.exchanges[-1]
    assert (last.status, last.content_type.split(";")[0]) == (200, "text/event-stream")
    kinds = [e["type"] for e in last.events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    deltas = [e["delta"] for e in last.events if e["type"] == "response.output_text.delta"]
    assert deltas, kinds  # the answer came in pieces
    assert "".join(deltas).strip() == messages[-1].strip()
    usage = last.events[-1]["response"]["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
