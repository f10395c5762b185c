"""`python -m gateway`: load settings, configure logging, serve (HTTPS when configured)."""

from __future__ import annotations

import signal
import sys

import uvicorn

from appliance.core.logging import configure_logging
from appliance.core.settings import ConfigError, load_settings
from gateway.app import create_app
from gateway.settings import GatewaySettings
from gateway.tls import resolve_tls


def main() -> int:
    try:
        settings = load_settings(GatewaySettings)
        tls = resolve_tls(settings.tls_cert, settings.tls_key, settings.tls_self_signed, settings.data_dir,
                          settings.host if settings.host not in ("0.0.0.0", "::") else "localhost")  # noqa: S104
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    configure_logging("gateway", settings.log_level, settings.log_json)
    app = create_app(settings)
    # uvicorn re-raises SIGTERM after its graceful shutdown (exit -15); a clean drain is a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None,
        timeout_graceful_shutdown=10, server_header=False,
        proxy_headers=False,  # identity is the API key; a client's X-Forwarded-For is never trusted
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
