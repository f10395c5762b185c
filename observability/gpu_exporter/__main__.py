"""``python -m observability.gpu_exporter``: load settings, log, serve /metrics on :9835."""

from __future__ import annotations

import sys

from aiohttp import web

from appliance.core.logging import configure_logging
from appliance.core.settings import ConfigError, load_settings
from observability.gpu_exporter.app import create_app
from observability.gpu_exporter.settings import GpuExporterSettings


def main() -> None:
    try:
        settings = load_settings(GpuExporterSettings)
    except ConfigError as exc:
        sys.stderr.write(f"gpu_exporter: {exc}\n")  # before logging exists
        raise SystemExit(2) from None
    configure_logging("gpu_exporter", settings.log_level, settings.log_json)
    import pynvml  # loads nothing until nvmlInit; the import stays out of module import time

    web.run_app(create_app(settings, pynvml), host=settings.host, port=settings.port, print=None,
                access_log=None, handle_signals=True)


if __name__ == "__main__":
    main()
