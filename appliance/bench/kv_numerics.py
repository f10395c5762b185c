"""``appliance bench kv_numerics [--json] [--defaults]``: do a token's logits depend on anything but its own
sequence? A raw llama.cpp check of the settings the worker relies on for exact prefix reuse (minutes of CPU:
run it after a llama.cpp upgrade, not in the suite).

Each line compares one prompt (A) after 6 greedy steps with a reference (A alone, prefilled in chunks of 32):
the answer's tokens (``same``) and the largest logit difference (``max_diff``), for A prefilled in other
chunk sizes, beside another sequence (B), after a prefix copied from B's sequence, and after a prefix restored
from host RAM into a busy context. The default is the worker's deterministic mode (``inference/model.py``:
one KV stream per sequence, no repacked weights, no flash attention, ``GGML_CPU_TILED_MM=0``): every case the
worker relies on is then ``same`` with ``max_diff`` 0 (``all_same``). One case is reported beside them: a
prompt token decoded alone, which the scheduler never does (``worker_relies_on`` false). ``--defaults``
uses llama.cpp's own settings, where most lines differ.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.bench import harness

__all__ = ["main"]

NSEQ, NCTX, BATCH, STEPS = 4, 1024, 520, 6
SYSTEM = "<start_of_turn>user\n" + "You are a terse assistant for a hardware store. " * 12 + "\n\n"


@dataclass
class Llama:
    """The raw llama.cpp model and one reusable batch, with the worker's exact settings or llama.cpp's own."""

    ll: Any
    model: Any
    vocab: Any
    n_vocab: int
    batch: Any
    exact: bool

    @contextmanager
    def context(self) -> Iterator[Any]:
        params = self.ll.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = NCTX * NSEQ, BATCH, BATCH, NSEQ
        params.kv_unified, params.swa_full = not self.exact, True  # one KV stream per sequence when exact
        params.n_threads = params.n_threads_batch = 2
        if self.exact:
            params.flash_attn_type = 0  # its tiled and KV-split kernels follow the batch's shape
        ctx = self.ll.llama_init_from_model(self.model, params)
        try:
            yield ctx
        finally:
            self.ll.llama_free(ctx)

    def tokens(self, text: str) -> list[int]:
        data = text.encode()
        buf = (self.ll.llama_token * 4096)()
        return list(buf[: self.ll.llama_tokenize(self.vocab, data, len(data), buf, 4096, True, True)])

    def decode(self, ctx: Any, items: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, wants logits) in one llama_decode call."""
        for index, (token, pos, seq, wants) in enumerate(items):
            self.batch.token[index], self.batch.pos[index] = token, pos
            self.batch.n_seq_id[index], self.batch.logits[index] = 1, int(wants)
            self.batch.seq_id[index][0] = seq
        self.batch.n_tokens = len(items)
        if self.ll.llama_decode(ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def logits(self, ctx: Any, index: int) -> Any:
        import numpy as np

        return np.ctypeslib.as_array(self.ll.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,)).copy()

    def prefill(self, ctx: Any, tokens: list[int], seq: int, chunks: list[int] | None = None, start: int = 0) -> Any:
        """Decode ``tokens[start:]`` in ``chunks`` (32 each by default); the last token's logits."""
        pos = start
        for size in chunks or [32] * (len(tokens) // 32 + 1):
            end = min(len(tokens), pos + size)
            self.decode(ctx, [(tokens[p], p, seq, p == len(tokens) - 1) for p in range(pos, end)])
            count, pos = end - pos, end
            if pos >= len(tokens):
                return self.logits(ctx, count - 1)
        raise ValueError("the chunks do not cover the prompt")

    def answer(self, ctx: Any, tokens: list[int], seq: int, chunks: list[int] | None = None,
               start: int = 0) -> tuple[list[int], Any]:
        """``STEPS`` greedy tokens after the prompt, and the logits after the last."""
        import numpy as np

        logits = self.prefill(ctx, tokens, seq, chunks, start)
        out, pos = [], len(tokens)
        for _ in range(STEPS):
            token = int(np.argmax(logits))
            out.append(token)
            self.decode(ctx, [(token, pos, seq, True)])
            pos += 1
            logits = self.logits(ctx, 0)
        return out, logits

    def copy_prefix(self, ctx: Any, src: int, dst: int, length: int) -> None:
        memory = self.ll.llama_get_memory(ctx)
        self.ll.llama_memory_seq_rm(memory, dst, -1, -1)
        if self.exact:  # one stream per sequence: the whole stream is copied, then cut back
            self.ll.llama_memory_seq_cp(memory, src, dst, -1, -1)
            if not self.ll.llama_memory_seq_rm(memory, dst, length, -1):
                raise RuntimeError("llama_memory_seq_rm refused to cut the copied stream")
        else:
            self.ll.llama_memory_seq_cp(memory, src, dst, 0, length)


def load(data_dir: Path, exact: bool) -> Llama:
    if exact:  # as the worker does: every row count takes the vec_dot kernel (read once per process)
        os.environ["GGML_CPU_TILED_MM"] = "0"
    import llama_cpp

    from appliance.core.model_files import prepare_default_model

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = not exact  # repacked weights: a 4-row gemm with a gemv remainder
    model = llama_cpp.llama_model_load_from_file(str(prepare_default_model(data_dir)).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    return Llama(llama_cpp, model, vocab, int(llama_cpp.llama_vocab_n_tokens(vocab)),
                 llama_cpp.llama_batch_init(BATCH, 0, 1), exact)


def compare(llama: Llama) -> list[dict[str, Any]]:
    """Every case against the reference: its name, ``same`` (the answer's tokens) and ``max_diff``."""
    import numpy as np

    a = llama.tokens(SYSTEM + "Say hello.<end_of_turn>\n<start_of_turn>model\n")
    b = llama.tokens(SYSTEM + "What is a hammer for?<end_of_turn>\n<start_of_turn>model\n")
    common = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    with llama.context() as ctx:
        reference, reference_logits = llama.answer(ctx, a, 0)
    lines: list[dict[str, Any]] = []

    def report(name: str, got: tuple[list[int], Any], worker_relies_on: bool = True) -> None:
        tokens, logits = got
        lines.append({"case": name, "same": tokens == reference, "worker_relies_on": worker_relies_on,
                      "max_diff": float(np.abs(logits - reference_logits).max())})
        harness.progress("kv_numerics", f"{name}: same={lines[-1]['same']} max_diff={lines[-1]['max_diff']:.3g}")

    chunkings = {"one chunk": [len(a)], "chunks of 45": [45] * 3, "chunks of 7, last 1": [7] * 20,
                 "chunks [96, 2, 36]": [96, 2, 36], "chunks [96, 1, 37] (a lone middle token)": [96, 1, 37]}
    for name, chunks in chunkings.items():
        with llama.context() as ctx:
            report(name, llama.answer(ctx, a, 0, chunks), worker_relies_on=1 not in chunks[:-1])
    with llama.context() as ctx:
        llama.prefill(ctx, b, 1)
        report("beside B in another sequence", llama.answer(ctx, a, 0))
    with llama.context() as ctx:
        llama.prefill(ctx, b, 1)
        llama.copy_prefix(ctx, 1, 2, common)
        report(f"prefix of {common} copied from another sequence", llama.answer(ctx, a, 2, start=common))
    ll = llama.ll
    with llama.context() as ctx:
        llama.prefill(ctx, b, 1)
        ll.llama_memory_seq_rm(ll.llama_get_memory(ctx), 1, common, -1)
        size = ll.llama_state_seq_get_size(ctx, 1)
        saved = (ctypes.c_uint8 * size)()
        written = ll.llama_state_seq_get_data(ctx, saved, size, 1)
    with llama.context() as ctx:
        llama.prefill(ctx, b[:50], 0)
        llama.prefill(ctx, a[:70], 2)
        if not ll.llama_state_seq_set_data(ctx, saved, written, 2):
            raise RuntimeError("llama_state_seq_set_data refused the saved prefix")
        report(f"prefix of {common} restored from RAM, busy context", llama.answer(ctx, a, 2, start=common))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser("kv_numerics", __doc__)
    parser.add_argument("--defaults", action="store_true", help="llama.cpp's own settings instead of the worker's")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("APPLIANCE_DATA_DIR", "data")))
    args = parser.parse_args(argv)
    lines = compare(load(args.data_dir, exact=not args.defaults))
    result = {"benchmark": "kv_numerics", "exact": not args.defaults, "cases": lines,
              "all_same": all(line["same"] and line["max_diff"] == 0 for line in lines if line["worker_relies_on"])}
    return harness.emit(result, args.json, _render)


def _render(result: Any) -> str:
    settings = "the worker's deterministic mode" if result["exact"] else "llama.cpp defaults"
    head = f"settings: {settings}; all the worker relies on the same: {result['all_same']}"
    rows = [f"  {line['case']:48s} same={line['same']!s:5s} max_diff={line['max_diff']:.3g}"
            + ("" if line["worker_relies_on"] else "  (never done by the worker)") for line in result["cases"]]
    return "\n".join([head, *rows])


if __name__ == "__main__":
    raise SystemExit(main())
