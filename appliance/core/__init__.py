"""What every service shares: settings, wire types, SSE, errors, request ids, logging, metrics.

This package imports nothing from the services.
"""

from appliance.core.errors import APIError, error_body
from appliance.core.settings import CommonSettings, ConfigError, load_settings
from appliance.core.sse import SSEDecoder, SSEEvent, encode_data, encode_error

__all__ = [
    "APIError",
    "CommonSettings",
    "ConfigError",
    "SSEDecoder",
    "SSEEvent",
    "encode_data",
    "encode_error",
    "error_body",
    "load_settings",
]
