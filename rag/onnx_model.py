"""A sentence-transformers model as one ONNX graph (encoder + pooling + L2 norm), exported once and cached.

The export needs torch, transformers and onnx; it runs at the first start with a
given model and writes ``<cache>/<fingerprint>/encoder.onnx`` atomically (a temp
directory renamed into place). The fingerprint hashes every file of the model
directory, so a changed model gets a new export and a half-written one is never
loaded. Later starts only hash the files and open the cached graph: no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.durable import fsync_path

__all__ = ["EXPORT_FORMAT", "ModelLayout", "OnnxUnavailable", "cached_export", "fingerprint", "read_layout"]

log = logging.getLogger(__name__)

# Bump when the exported graph changes (inputs, pooling, opset): old caches are then ignored.
EXPORT_FORMAT = 1
_OPSET = 17
ENCODER = "encoder.onnx"
ENCODER_INT8 = "encoder-int8.onnx"


class OnnxUnavailable(RuntimeError):
    """This model cannot run on ONNX Runtime here (missing package, unsupported layout, failed export)."""


@dataclass(frozen=True)
class ModelLayout:
    """What the ONNX path needs to know about a sentence-transformers directory."""

    path: Path
    pooling: str  # "mean" | "cls"
    max_tokens: int
    dimension: int


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OnnxUnavailable(f"{path.name} is missing or unreadable: {exc}") from None


def read_layout(path: Path) -> ModelLayout:
    """Transformer → Pooling (mean or CLS) → optional Normalize, with a fast tokenizer; else unavailable."""
    modules = _json(path / "modules.json")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) or modules[0]["path"]:
        raise OnnxUnavailable(f"unsupported sentence-transformers modules {kinds}")
    if not (path / "tokenizer.json").is_file():
        raise OnnxUnavailable("no tokenizer.json (fast tokenizer) in the model directory")
    pooling_config = _json(path / modules[1]["path"] / "config.json")
    modes = {k.removeprefix("pooling_mode_") for k, v in pooling_config.items() if k.startswith("pooling_mode_") and v}
    if modes == {"mean_tokens"}:
        pooling = "mean"
    elif modes == {"cls_token"}:
        pooling = "cls"
    else:
        raise OnnxUnavailable(f"unsupported pooling {sorted(modes)}")
    st_config = _json(path / "sentence_bert_config.json")
    config = _json(path / "config.json")
    max_tokens = int(st_config.get("max_seq_length") or config.get("max_position_embeddings", 512))
    return ModelLayout(path, pooling, max_tokens, int(pooling_config["word_embedding_dimension"]))


def fingerprint(path: Path) -> str:
    """sha256 over every file of the model directory (relative name and content) and the export format."""
    digest = hashlib.sha256(f"format={EXPORT_FORMAT};opset={_OPSET}\n".encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\n".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def cached_export(layout: ModelLayout, cache_dir: Path, int8: bool) -> Path:
    """The directory holding ``encoder.onnx`` (and ``encoder-int8.onnx`` when asked), exporting when absent."""
    target = cache_dir / fingerprint(layout.path)
    wanted = [ENCODER, *([ENCODER_INT8] if int8 else [])]
    if all((target / name).is_file() for name in wanted):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*cache_dir.glob(".tmp-*"), *cache_dir.glob(".old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a process killed mid-export
    work = cache_dir / f".tmp-{uuid.uuid4().hex}"
    work.mkdir()
    try:
        if (target / ENCODER).is_file():
            shutil.copy2(target / ENCODER, work / ENCODER)
        else:
            log.info("exporting the embedding model to ONNX (once per model)", extra={"model": str(layout.path)})
            _export(layout, work / ENCODER)
        if int8:
            _quantize(work / ENCODER, work / ENCODER_INT8)
        for name in wanted:
            fsync_path(work / name)
        _replace_dir(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _export(layout: ModelLayout, out: Path) -> None:
    try:
        import inspect

        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise OnnxUnavailable(f"the ONNX export needs torch and transformers: {exc}") from None
    model = AutoModel.from_pretrained(str(layout.path), local_files_only=True).eval()
    accepts = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask", *(["token_type_ids"] if "token_type_ids" in accepts else [])]

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            hidden = self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state
            if layout.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = inputs[1].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    sample = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    args = {"input_ids": sample, "attention_mask": (sample > 0).long(), "token_type_ids": torch.zeros_like(sample)}
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                Encoder(),
                tuple(args[n] for n in names),
                str(out),
                dynamo=False,
                input_names=names,
                output_names=["embedding"],
                dynamic_axes={**axes, "embedding": {0: "batch"}},
                opset_version=_OPSET,
            )
    except Exception as exc:  # the exporter raises many kinds; all mean "use torch instead"
        raise OnnxUnavailable(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc


def _quantize(fp32: Path, out: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]
    except ImportError as exc:
        raise OnnxUnavailable(f"int8 quantization needs onnxruntime and onnx: {exc}") from None
    import onnx

    # Measured on all-MiniLM-L6-v2 (cosine of query vectors to fp32): per-tensor int8 0.95-0.98, per-channel
    # 0.988-0.996, per-channel with the feed-forward output projections (the GELU outliers) kept in fp32
    # >= 0.993. The reduced range avoids int16 saturation in AVX2 kernels without VNNI.
    graph = onnx.load(str(fp32), load_external_data=False).graph
    keep = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and "/output/dense/" in n.name and "/attention/" not in n.name
    ]
    quantize_dynamic(
        str(fp32),
        str(out),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=True,
        nodes_to_exclude=keep,
    )



def _replace_dir(work: Path, target: Path) -> None:
    """Move ``work`` to ``target``; an existing ``target`` (a smaller earlier export) is set aside first."""
    old = target.with_name(f".old-{uuid.uuid4().hex}")
    if target.exists():
        os.replace(target, old)
    os.replace(work, target)
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)
