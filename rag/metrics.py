"""The RAG service's Prometheus metrics (names fixed in docs/CONTRACTS.md), on the app's own registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from appliance.core.metrics import LATENCY_BUCKETS, new_registry

__all__ = ["CollectionStats", "RagMetrics"]

_FAST_BUCKETS = (0.001, 0.0025, *LATENCY_BUCKETS)


@dataclass(frozen=True)
class CollectionStats:
    name: str
    documents: int
    chunks: int
    vectors: int


class RagMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        self.documents = Gauge(
            "appliance_rag_documents", "Documents per collection.", ["collection"], registry=self.registry
        )
        self.chunks = Gauge("appliance_rag_chunks", "Chunks per collection.", ["collection"], registry=self.registry)
        self.index_vectors = Gauge(
            "appliance_rag_index_vectors",
            "Live vectors in a collection's index.",
            ["collection"],
            registry=self.registry,
        )
        self.embed_seconds = Histogram(
            "appliance_rag_embed_seconds",
            "Time to embed one batch of texts.",
            buckets=_FAST_BUCKETS,
            registry=self.registry,
        )
        self.search_seconds = Histogram(
            "appliance_rag_search_seconds",
            "Index search and chunk lookup time.",
            buckets=_FAST_BUCKETS,
            registry=self.registry,
        )
        self.ingested_chunks = Counter(
            "appliance_rag_ingested_chunks", "Chunks ingested (rate = ingest rate).", registry=self.registry
        )
        self.ingested_documents = Counter(
            "appliance_rag_ingested_documents", "Documents ingested.", registry=self.registry
        )

    def set_collections(self, stats: list[CollectionStats]) -> None:
        for gauge in (self.documents, self.chunks, self.index_vectors):
            gauge.clear()
        for item in stats:
            self.documents.labels(item.name).set(item.documents)
            self.chunks.labels(item.name).set(item.chunks)
            self.index_vectors.labels(item.name).set(item.vectors)
