"""One GGUF model and its llama.cpp context, through llama-cpp-python's C API.

The context is sized for the scheduler: ``slots`` sequences, ``n_ctx`` KV cells
each, and one decode call takes a token for every running sequence plus a
chunk of prompt prefill.

Two decode modes (``[worker] deterministic``, published in ``/health`` under
``decode``). The default, fast, takes llama.cpp's fastest kernels: one unified
KV cache, repacked weights, the tiled K-quant matmul, flash attention as
llama.cpp chooses. The deterministic mode (CPU only) is batch-invariant: a
token's numbers do not depend on what else is decoded with it, so prompt-prefix
reuse and speculation give the answers a fresh prefill gives, bit for bit.
On llama.cpp's CPU backend (``appliance bench kv_numerics`` checks it), four things make them depend on
it, and this mode removes each: a unified KV cache (the softmax and the
attention-weighted sum run over every cell, so other sequences' cells change
the summation order: one KV stream per slot instead), the K-quant matmul that
switches to a tiled kernel at 8 rows (turned off, so every row count takes the
vec_dot kernel: ``GGML_CPU_TILED_MM=0``, read once per process; forcing the tiled
kernel everywhere is exact too but decodes one stream ~35 % slower), repacked weights (4-row
kernels plus a remainder path: not used), and flash attention (tile and
KV-split kernels by batch shape: off). The scheduler does the rest (see
inference.scheduler): each prompt chunk is decoded on its own, never as a
single token.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.model_files import prepare_default_model, sha256_file
from inference.settings import WorkerSettings

__all__ = ["DecodeMode", "LoadedModel", "ModelRefused", "load_model", "resolve_model_path"]

log = logging.getLogger(__name__)

# ggml reads this once, at the first matmul of the process: set it before any model computes anything.
TILED_SWITCH_ENV = "GGML_CPU_TILED_MM"


class ModelRefused(Exception):
    """The model file cannot be served (missing, not allowed, not loadable)."""


def resolve_model_path(settings: WorkerSettings) -> Path:
    if not settings.model_path:
        return prepare_default_model(settings.data_dir)
    path = Path(settings.model_path)
    if not path.is_file():
        raise ModelRefused(f"model file not found: {path}")
    return path


@dataclass(frozen=True, slots=True)
class ContextShape:
    slots: int
    n_ctx_per_slot: int
    n_batch: int
    threads: int


@dataclass(frozen=True, slots=True)
class DecodeMode:
    """What the context decodes with: the ``decode`` object of the worker's ``/health``."""

    deterministic: bool  # batch-invariant (exact prefix reuse and speculation)
    kv_unified: bool  # one KV cache for every slot (else one stream per slot)
    repacked: bool  # weights repacked for the CPU's wide kernels
    tiled_matmul: bool  # the tiled K-quant matmul at 8+ rows
    flash_attn: str  # "auto" (llama.cpp decides) or "off"
    speculative: bool  # prompt-lookup drafting (decided per request and step)

    def describe(self) -> dict[str, object]:
        return {
            "mode": "deterministic" if self.deterministic else "fast",
            "kernels": {"repacked": self.repacked, "tiled_matmul": self.tiled_matmul, "flash_attn": self.flash_attn},
            "kv_unified": self.kv_unified,
            "speculative": self.speculative,
        }


def _gpu_layers(llama: Any, requested: int) -> int:
    if requested >= 0:
        return requested
    return 999 if llama.llama_supports_gpu_offload() else 0


class LoadedModel:
    """A model plus context; every method but the tokenizer ones belongs to the decode thread."""

    def __init__(self, path: Path, sha256: str, settings: WorkerSettings) -> None:
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(
            logging.DEBUG if settings.log_level == "DEBUG" else logging.ERROR
        )
        self.llama: Any = llama_cpp
        self.path = path
        self.sha256 = sha256
        self.shape = ContextShape(
            slots=settings.slots,
            n_ctx_per_slot=settings.n_ctx,
            # Deterministic mode: generating sequences decode two tokens each (their previous one again).
            n_batch=max(settings.slots + settings.prefill_chunk, 2 * settings.slots if settings.deterministic else 0),
            threads=settings.threads(),
        )
        self.swa_full = settings.prefix_reuse
        self.gpu_layers = _gpu_layers(llama_cpp, settings.n_gpu_layers)
        # Batch-invariant decoding is a CPU property (GPU kernels pick tiles by batch shape too; not handled).
        self.exact = settings.deterministic and self.gpu_layers == 0
        if settings.deterministic and not self.exact:
            log.warning("deterministic decoding is a CPU mode: decoding with the GPU's fast kernels instead")
        if self.exact:
            os.environ[TILED_SWITCH_ENV] = "0"
        self.decode_mode = DecodeMode(
            deterministic=self.exact, kv_unified=not self.exact, repacked=not self.exact,
            tiled_matmul=os.environ.get(TILED_SWITCH_ENV, "1") != "0", flash_attn="off" if self.exact else "auto",
            speculative=settings.speculative,
        )
        llama_cpp.llama_backend_init()
        self._split = (ctypes.c_float * max(1, len(settings.tensor_split)))(*settings.tensor_split)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self.gpu_layers
        params.main_gpu = settings.main_gpu
        if settings.tensor_split:
            params.tensor_split = self._split
        if self.exact:
            params.use_extra_bufts = False  # repacked weights: 4-row kernels and a remainder path
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ModelRefused(f"llama.cpp could not load {path}")
        self.ctx = self._new_context()
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.model))  # sliding window (0: every layer sees all)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)

    def _new_context(self) -> Any:
        llama = self.llama
        shape = self.shape
        params = llama.llama_context_default_params()
        params.n_ctx = shape.slots * shape.n_ctx_per_slot
        params.n_batch = shape.n_batch
        params.n_ubatch = shape.n_batch
        params.n_seq_max = shape.slots
        params.n_threads = shape.threads
        params.n_threads_batch = shape.threads
        # One KV stream per slot when exact: a sequence's cells then sit at the same places whatever the
        # other slots hold (a copy between slots copies the stream).
        params.kv_unified = not self.exact
        # Prefix reuse needs every cell of a kept prefix: a full-size sliding-window cache keeps them all
        # (the window is applied by the attention mask), a small one drops what left the window.
        params.swa_full = self.swa_full
        if self.exact:
            params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED: its kernels depend on the batch shape
        params.no_perf = True
        ctx = llama.llama_init_from_model(self.model, params)
        if not ctx:
            llama.llama_model_free(self.model)
            raise ModelRefused("llama.cpp could not create a context (out of memory?)")
        return ctx

    # -- tokenizer (read-only on the vocabulary; safe from any thread) --

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (self.llama.llama_token * capacity)()
        count = self.llama.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if count < 0:  # buffer too small: -count is the size needed
            capacity = -count
            tokens = (self.llama.llama_token * capacity)()
            count = self.llama.llama_tokenize(
                self.vocab,
                data,
                len(data),
                tokens,
                capacity,
                add_special,
                parse_special,
            )
        return list(tokens[:count])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        size = self.llama.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        if size < 0:
            buf = ctypes.create_string_buffer(-size)
            size = self.llama.llama_token_to_piece(self.vocab, token, buf, -size, 0, False)
            value = buf.raw[:size]
        else:
            value = self._piece_buf.raw[:size]
        self._pieces[token] = value
        return value

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self.llama.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        raw = self.llama.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def bos_text(self) -> str:
        bos = int(self.llama.llama_vocab_bos(self.vocab))
        return self.token_text(bos) if bos >= 0 else ""

    def eos_text(self) -> str:
        eos = int(self.llama.llama_vocab_eos(self.vocab))
        return self.token_text(eos) if eos >= 0 else ""

    def metadata(self, key: str) -> str | None:
        size = self.llama.llama_model_meta_val_str(self.model, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        self.llama.llama_model_meta_val_str(self.model, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.ctx:
            self.llama.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.llama.llama_model_free(self.model)
            self.model = None


def load_model(settings: WorkerSettings) -> LoadedModel:
    """Resolve, verify (sha256 allow-list) and load; blocking, run it off the event loop."""
    path = resolve_model_path(settings)
    digest = sha256_file(path)
    if settings.allowed_sha256 and digest not in settings.allowed_sha256:
        raise ModelRefused(f"model {path.name} has sha256 {digest}, which is not in allowed_sha256")
    log.info("loading model", extra={"path": str(path), "sha256": digest})
    return LoadedModel(path, digest, settings)
