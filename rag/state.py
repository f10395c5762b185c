"""The app's state: settings, token, metrics, jobs and (once started) the service."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from appliance.core.errors import APIError, overloaded
from rag.embedding import Embedder
from rag.jobs import JobRunner
from rag.metrics import RagMetrics
from rag.service import RagService
from rag.settings import RagSettings

__all__ = ["STATE", "EmbedderFactory", "RagState"]

EmbedderFactory = Callable[[], Embedder]


@dataclass
class RagState:
    settings: RagSettings
    token: str
    metrics: RagMetrics
    embedder_factory: EmbedderFactory
    jobs: JobRunner = field(default_factory=JobRunner)
    service: RagService | None = None
    failure: str | None = None

    def ready(self) -> RagService:
        if self.service is None:
            if self.failure:
                raise APIError(
                    503, f"The RAG service failed to start: {self.failure}", type_="server_error", code="unavailable"
                )
            raise overloaded("The embedding model is still loading.", retry_after=2)
        return self.service


STATE = web.AppKey("rag_state", RagState)


STATE = web.AppKey("rag_state", RagState)
