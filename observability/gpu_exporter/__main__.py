"""``python -m observability.gpu_exporter``: load settings, log, serve /metrics on :9835."""

from __future__ import annotations

from aiohttp import web

from appliance.core.entry import load_or_exit
from observability.gpu_exporter.app import create_app
from observability.gpu_exporter.settings import GpuExporterSettings


def main() -> None:
    settings = load_or_exit(GpuExporterSettings, "gpu_exporter")
    import pynvml  # loads nothing until nvmlInit; the import stays out of module import time

    web.run_app(create_app(settings, pynvml), host=settings.host, port=settings.port, print=None,
                access_log=None, handle_signals=True)


if __name__ == "__main__":
    main()
