"""The embedding model on ONNX Runtime: the same vectors as sentence-transformers, without importing torch.

Why: a short query through sentence-transformers is mostly per-op overhead of
eager torch and fp32 weights streamed from memory for a handful of tokens; ONNX
Runtime runs the same graph in a fraction of that time (``appliance bench rag``
measures both). Starting without torch also makes a restart much shorter.

Queries can use a dynamically int8-quantised copy of the graph (``query_int8``):
it is smaller than the L3 cache, so a short query gets faster again, its vectors
close to (not equal to) the fp32 ones; stored chunk vectors always come from fp32.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from rag.embedding import EmbedderOptions, Vectors, length_batches
from rag.onnx_model import ENCODER, ENCODER_INT8, ModelLayout, OnnxUnavailable, cached_export

__all__ = ["OnnxEmbedder", "load_onnx_embedder"]

log = logging.getLogger(__name__)

# What one more session.run costs, in padded tokens of compute: a run's fixed cost over the cost of one token
# at short lengths (all-MiniLM-L6-v2, one text; longer texts cost more per token, attention).
RUN_COST_TOKENS = 24


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # No busy-waiting between runs: the host's other services (inference workers) need those cycles.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEmbedder:
    """Tokenizes with the model's own ``tokenizer.json`` and runs the exported graph (pooling and norm inside)."""

    def __init__(
        self, name: str, layout: ModelLayout, tokenizer: Any, *, batch_session: Any, query_session: Any, batch_size: int
    ) -> None:
        self._name = name
        self._layout = layout
        self._batch_size = batch_size
        self._batch_session = batch_session
        self._query_session = query_session
        self._inputs = [i.name for i in batch_session.get_inputs()]
        # Two copies: one truncating at the model's limit (for encoding), one not (for chunking and counting).
        self._encoding = tokenizer
        self._encoding.no_padding()
        self._encoding.enable_truncation(layout.max_tokens)
        from tokenizers import Tokenizer

        self._counting = Tokenizer.from_str(tokenizer.to_str())
        self._counting.no_truncation()

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def dimension(self) -> int:
        return self._layout.dimension

    @property
    def device(self) -> str:
        return "cpu (onnxruntime)"

    def _feeds(self, texts: list[str]) -> dict[str, Any]:
        return self._pack(self._encoding.encode_batch(texts))

    def _pack(self, encoded: list[Any]) -> dict[str, Any]:
        width = max(len(e.ids) for e in encoded)
        ids = np.zeros((len(encoded), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, item in enumerate(encoded):
            ids[row, : len(item.ids)] = item.ids
            mask[row, : len(item.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: feeds[name] for name in self._inputs}

    def _run(self, session: Any, feeds: dict[str, Any]) -> Vectors:
        out: Vectors = np.ascontiguousarray(session.run(None, feeds)[0], dtype=np.float32)
        return out

    def encode(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        encoded = self._encoding.encode_batch(texts)  # once: the batches are cut by these token counts
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for rows in length_batches([len(e.ids) for e in encoded], self._batch_size, RUN_COST_TOKENS):
            out[rows] = self._run(self._batch_session, self._pack([encoded[i] for i in rows]))
        return out

    def encode_queries(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return self._run(self._query_session, self._feeds(texts))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        encoded = self._counting.encode(text, add_special_tokens=False)
        return [(int(a), int(b)) for a, b in encoded.offsets if b > a]

    def count_tokens(self, texts: list[str]) -> int:
        if not texts:
            return 0
        return sum(len(e.ids) for e in self._counting.encode_batch(texts))


def load_onnx_embedder(layout: ModelLayout, name: str, options: EmbedderOptions) -> OnnxEmbedder:
    """Open (exporting once if needed) the cached graph; raises OnnxUnavailable when this cannot work here."""
    try:
        import onnxruntime  # noqa: F401
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise OnnxUnavailable(f"onnxruntime is not installed: {exc}") from None
    if options.cache_dir is None:
        raise OnnxUnavailable("no cache directory for the ONNX export")
    folder = cached_export(layout, options.cache_dir, options.query_int8)
    threads = options.threads or os.cpu_count() or 1
    query_threads = options.query_threads or threads
    batch_session = _session(folder / ENCODER, threads)
    if options.query_int8 or query_threads != threads:
        query_session = _session(folder / (ENCODER_INT8 if options.query_int8 else ENCODER), query_threads)
    else:
        query_session = batch_session  # one copy of the fp32 weights
    tokenizer = Tokenizer.from_file(str(layout.path / "tokenizer.json"))
    return OnnxEmbedder(
        name, layout, tokenizer, batch_session=batch_session, query_session=query_session, batch_size=options.batch_size
    )
