"""Readiness probes the runtime uses: HTTP health endpoints and Redis PING."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["Probe", "probe_http", "probe_redis"]


@dataclass(frozen=True)
class Probe:
    ok: bool
    status: int | None = None
    body: Any = None
    error: str | None = None


def probe_http(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> Probe:
    try:
        # Loopback only; the gateway may use a self-signed certificate of our own making.
        response = httpx.get(url, timeout=timeout, headers=headers, verify=False)  # noqa: S501
    except httpx.HTTPError as exc:
        return Probe(False, error=type(exc).__name__)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text[:200]
    return Probe(response.status_code == 200, response.status_code, body)


def probe_redis(port: int, timeout: float = 1.0) -> Probe:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError as exc:
        return Probe(False, error=type(exc).__name__)
    # The default user is off: an anonymous PING gets NOAUTH, which says Redis is up and serving.
    return Probe(reply.startswith((b"+PONG", b"-NOAUTH")), body=reply.decode(errors="replace").strip())
