"""``python -m inference``: load settings, configure logging, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web

from appliance.core.entry import load_or_exit
from inference.app import create_app
from inference.keys import SERVICE
from inference.registration import withdraw_before_stop
from inference.settings import WorkerSettings

# Let the decode thread take the GIL back quickly when llama_decode returns.
SWITCH_INTERVAL_S = 0.001


async def serve(settings: WorkerSettings) -> int:
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=settings.shutdown_drain_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    failing = asyncio.create_task(app[SERVICE].failed.wait())
    try:
        await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        failing.cancel()
        await withdraw_before_stop(app)  # balancers drain this worker while it still listens
        await runner.cleanup()
    return 1 if app[SERVICE].failed.is_set() else 0


def main() -> int:
    settings = load_or_exit(WorkerSettings, "worker")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
