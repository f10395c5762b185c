"""The RAG service's one typed settings object (env ``APPLIANCE_RAG_*``, toml ``[rag]``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from appliance.core.settings import CommonSettings

__all__ = ["RagSettings"]


class RagSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_RAG_", frozen=True, extra="ignore", populate_by_name=True)
    toml_section: ClassVar[str] = "rag"

    host: str = "127.0.0.1"
    port: int = Field(default=8300, ge=1, le=65535)
    embedding_model: str = Field(
        default="", description="Path of a local sentence-transformers model; empty = bundled all-MiniLM-L6-v2."
    )
    embedding_device: str = Field(default="auto", description="auto (cuda when torch sees a GPU), cpu, cuda, …")
    compute_threads: int = Field(
        default=0, ge=0, description="Threads for torch and FAISS; 0 = the libraries' default (all cores)."
    )
    embedding_backend: Literal["auto", "torch", "onnx"] = Field(
        default="auto",
        description="auto: ONNX Runtime on CPU (exported once to data_dir/rag/onnx), torch on a GPU "
        "or when ONNX is unavailable; torch: sentence-transformers; onnx: ONNX Runtime or fail.",
    )
    query_threads: int = Field(
        default=0, ge=0, description="ONNX threads for a search query; 0 = compute_threads (one shared session)."
    )
    query_int8: bool = Field(
        default=False, description="Search queries through an int8-quantised copy of the model (ONNX only)."
    )
    faiss_gpu: Literal["auto", "off"] = Field(
        default="auto", description="auto: search a GPU copy of flat indexes when faiss sees a GPU."
    )
    embed_batch_size: int = Field(default=32, ge=1, le=1024)
    chunk_tokens: int = Field(default=192, ge=16, le=8192)
    chunk_overlap: int = Field(default=32, ge=0)
    approx_threshold: int = Field(default=50_000, ge=1, description="Vectors past which a collection uses HNSW.")
    approx_kind: Literal["hnsw"] = "hnsw"
    hnsw_m: int = Field(default=32, ge=4, le=128)
    hnsw_ef_construction: int = Field(default=80, ge=8)
    hnsw_ef_search: int = Field(default=512, ge=8)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_jobs_per_key: int = Field(
        default=4, ge=1, description="Upload jobs one key (as the gateway names it) may have queued or running."
    )
    job_threshold_bytes: int = Field(
        default=1024 * 1024, ge=0, description="Uploads larger than this run as a job (202 + /jobs/{id})."
    )
    index_flush_interval_s: float = Field(default=5.0, gt=0)
    max_top_k: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> RagSettings:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("chunk_overlap must be smaller than chunk_tokens")
        return self

    @property
    def rag_dir(self) -> Path:
        return self.data_dir / "rag"

    @property
    def onnx_cache_dir(self) -> Path:
        return self.rag_dir / "onnx"
