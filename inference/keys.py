"""Typed aiohttp app keys for the worker's state."""

from __future__ import annotations

from aiohttp import web

from inference.metrics import WorkerMetrics
from inference.service import WorkerService
from inference.settings import WorkerSettings

__all__ = ["METRICS", "SERVICE", "SETTINGS", "TOKEN"]

SETTINGS = web.AppKey("settings", WorkerSettings)
SERVICE = web.AppKey("service", WorkerService)
METRICS = web.AppKey("metrics", WorkerMetrics)
TOKEN = web.AppKey("internal_token", str)
