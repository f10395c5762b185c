"""What an embedder is (the protocol, its vectors) and how one is chosen (the options): the types shared by
``rag.embedder`` (torch, the hash test embedder, the loader) and ``rag.onnx_embedder``, which import this
module and not each other at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["Embedder", "EmbedderOptions", "Vectors", "length_batches"]

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


def length_batches(lengths: Sequence[int], max_rows: int, run_cost: int) -> list[list[int]]:
    """Row groups to encode together: longest first, cut where padded tokens plus ``run_cost`` per batch
    are least (at most ``max_rows`` rows each; every row is padded to its batch's longest).

    Why not fixed slices of the length-sorted rows: one document's chunks are a few full windows and a
    short tail per section, and padding the tails to the full windows cost a sixth more compute on the
    bench corpus (28,905 padded tokens for 21,987 real). Exact minimum by dynamic programming, O(rows x
    max_rows).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0] + [-1] * n  # best[j]: least cost of the first j rows of ``order``
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + (j - i) * lengths[order[i]] + run_cost  # order[i] is the batch's longest
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    while n > 0:
        groups.append(order[cut[n] : n])
        n = cut[n]
    return groups[::-1]
