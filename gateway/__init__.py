"""The gateway: the appliance's single public entry point (OpenAI API, keys, quotas, cache, RAG)."""

from gateway.app import create_app
from gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]
