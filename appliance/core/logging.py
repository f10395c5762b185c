"""Structured logging: one JSON object per line, with the request id on every line."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from appliance.core.request_id import request_id_var

__all__ = ["JsonFormatter", "configure_logging"]

# Client text can hold lone UTF-16 surrogates (JSON "\ud800"): a line must still encode, whatever the stream.
_SURROGATE = re.compile("[\ud800-\udfff]")

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = json.dumps(entry, default=str, ensure_ascii=False)
        if _SURROGATE.search(line):
            line = json.dumps(entry, default=str)  # escaped as \ud800: the JSON still says what came in
        return line


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        request_id = request_id_var.get()
        prefix = f"[{request_id}] " if request_id else ""
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {prefix}{record.getMessage()}"
        return _SURROGATE.sub("\ufffd", line)


def configure_logging(service: str, level: str = "INFO", json_lines: bool = True) -> None:
    """Install one stderr handler on the root logger (called by entry points, not at import)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if json_lines else _PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
