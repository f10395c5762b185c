"""`python -m gateway`: load settings, configure logging, serve (HTTPS when configured)."""

from __future__ import annotations

import signal
import socket
import sys

import uvicorn

from appliance.core.entry import CONFIG_ERROR_EXIT, load_or_exit
from appliance.core.logging import configure_logging
from appliance.core.settings import ConfigError
from gateway.app import create_app
from gateway.settings import GatewaySettings
from gateway.tls import resolve_tls


def _listen_socket(host: str, port: int) -> socket.socket:
    """Bound, not yet listening: uvicorn listens once the app has started, so a gateway started beside a
    running one on the same port (SO_REUSEPORT, `appliance upgrade`) takes connections only when ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # same user only (Linux)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main() -> int:
    settings = load_or_exit(GatewaySettings, "gateway", configure_logs=False)
    try:  # a TLS mistake is a configuration error too: reported before logging is configured, exit 2
        names = [*settings.tls_names, *([settings.host] if settings.host not in ("0.0.0.0", "::") else [])]  # noqa: S104
        tls = resolve_tls(settings.tls_cert, settings.tls_key, settings.tls_self_signed, settings.data_dir, names)
    except ConfigError as exc:
        sys.stderr.write(f"gateway: {exc}\n")
        return CONFIG_ERROR_EXIT
    configure_logging("gateway", settings.log_level, settings.log_json)
    app = create_app(settings)
    # uvicorn re-raises SIGTERM after its graceful shutdown (exit -15); a clean drain is a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        ssl_certfile=str(tls[0]) if tls else None,
        ssl_keyfile=str(tls[1]) if tls else None,
        timeout_graceful_shutdown=settings.shutdown_drain_s,
        server_header=False,
        proxy_headers=False,  # identity is the API key; a client's X-Forwarded-For is never trusted
    )
    uvicorn.Server(config).run(sockets=[_listen_socket(settings.host, settings.port)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
