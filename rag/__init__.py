"""The RAG service: embeddings, document store, FAISS retriever (``python -m rag``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["RagSettings", "create_app"]

if TYPE_CHECKING:
    from rag.app import create_app
    from rag.settings import RagSettings


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not pull in aiohttp, faiss or torch.
    if name == "create_app":
        from rag.app import create_app

        return create_app
    if name == "RagSettings":
        from rag.settings import RagSettings

        return RagSettings
    raise AttributeError(name)
