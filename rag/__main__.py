"""``python -m rag``: load settings, configure logging, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

from appliance.core.entry import load_or_exit


def main() -> int:
    from rag.settings import RagSettings

    settings = load_or_exit(RagSettings, "rag")
    from aiohttp import web

    from rag.app import create_app

    web.run_app(
        create_app(settings), host=settings.host, port=settings.port, print=None, access_log=None, shutdown_timeout=10
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
