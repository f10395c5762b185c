"""``python -m balancer``: load settings, configure logging, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

from aiohttp import web

from appliance.core.logging import configure_logging
from appliance.core.settings import ConfigError, load_settings
from balancer.app import create_app
from balancer.settings import BalancerSettings


def main() -> int:
    try:
        settings = load_settings(BalancerSettings)
    except ConfigError as exc:
        sys.stderr.write(f"balancer: {exc}\n")
        return 2
    configure_logging("balancer", settings.log_level, settings.log_json)
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # uvloop is an optimisation, not a requirement
        pass
    web.run_app(create_app(settings), host=settings.host, port=settings.port, access_log=None,
                handler_cancellation=True, print=None, loop=loop, shutdown_timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
