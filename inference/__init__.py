"""The inference worker: one GGUF model served with continuous batching over OpenAI endpoints.

Nothing is loaded at import; ``create_app(settings)`` builds the aiohttp app and
``python -m inference`` runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app"]

if TYPE_CHECKING:
    from inference.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from inference.app import create_app

        return create_app
    raise AttributeError(name)
