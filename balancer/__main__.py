"""``python -m balancer``: load settings, configure logging, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

from aiohttp import web

from appliance.core.entry import load_or_exit
from balancer.app import create_app
from balancer.settings import BalancerSettings


def main() -> int:
    settings = load_or_exit(BalancerSettings, "balancer")
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # uvloop is an optimisation, not a requirement
        pass
    web.run_app(create_app(settings), host=settings.host, port=settings.port, access_log=None,
                handler_cancellation=True, print=None, loop=loop, shutdown_timeout=settings.shutdown_drain_s,
                reuse_port=True)  # `appliance upgrade` starts a second balancer beside this one
    return 0


if __name__ == "__main__":
    sys.exit(main())
