"""What an embedder is (the protocol, its vectors) and how one is chosen (the options): the types shared by
``rag.embedder`` (torch, the hash test embedder, the loader) and ``rag.onnx_embedder``, which import this
module and not each other at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["Embedder", "EmbedderOptions", "Vectors"]

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors; knows its own tokenizer."""

    @property
    def model_name(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    def encode(self, texts: list[str]) -> Vectors: ...

    def encode_queries(self, texts: list[str]) -> Vectors:
        """Like ``encode``, for a few short search queries (may use a faster, close approximation)."""
        ...

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the model's tokens in ``text`` (for chunking by tokens)."""
        ...

    def count_tokens(self, texts: list[str]) -> int: ...


@dataclass(frozen=True)
class EmbedderOptions:
    """How to load the embedding model (from RagSettings; the bench builds its own)."""

    model_path: str = ""
    device: str = "auto"
    batch_size: int = 32
    threads: int = 0
    backend: str = "auto"  # auto | torch | onnx
    cache_dir: Path | None = None  # where ONNX exports are kept; None: the torch backend only
    query_threads: int = 0
    query_int8: bool = False
