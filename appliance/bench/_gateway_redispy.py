"""The gateway with redis-py's pipeline on its hot path, for ``appliance bench gateway``'s side-by-side run.

Run as a process: ``python -m appliance.bench._gateway_redispy`` with the gateway's usual environment
(plain HTTP). The same app and uvicorn options as ``python -m gateway``; only the hot path's client differs.
"""

from __future__ import annotations

import uvicorn

from appliance.core.entry import load_or_exit
from gateway.app import create_app
from gateway.hot_redis import RedisPyPipeline
from gateway.settings import GatewaySettings


def main() -> int:
    settings = load_or_exit(GatewaySettings, "gateway")
    app = create_app(settings, hot_redis=lambda _settings, client: RedisPyPipeline(client))
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False, server_header=False,
                proxy_headers=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
