"""``python -m rag``: load settings, configure logging, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

from appliance.core.logging import configure_logging
from appliance.core.settings import ConfigError, load_settings


def main() -> int:
    from rag.settings import RagSettings

    try:
        settings = load_settings(RagSettings)
    except ConfigError as exc:
        sys.stderr.write(f"rag: {exc}\n")
        return 2
    configure_logging("rag", settings.log_level, settings.log_json)
    from aiohttp import web

    from rag.app import create_app

    web.run_app(
        create_app(settings), host=settings.host, port=settings.port, print=None, access_log=None, shutdown_timeout=10
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
