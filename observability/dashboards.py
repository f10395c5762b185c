"""Grafana dashboards as code: ``python -m observability.dashboards`` rewrites the provisioned JSON.

The JSON under ``grafana/dashboards/`` is what Grafana loads; a unit test checks
it equals what this module builds, so edit here and regenerate.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DASHBOARDS", "build", "write_all"]

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RI = "$__rate_interval"
MODEL = 'model=~"$model"'
API = 'route=~"/v1/.+"'  # user traffic, without scrapes and health probes


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: tuple[tuple[str, str], ...]  # (expr, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    rows: tuple[Row, ...]
    variables: tuple[tuple[str, str], ...] = field(default=())  # (name, label_values query)


def _quantiles(metric: str, by: str, selector: str = "") -> tuple[tuple[str, str], ...]:
    inner = f"sum by (le{', ' + by if by else ''}) (rate({metric}_bucket{{{selector}}}[{RI}]))"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple((f"histogram_quantile({q}, {inner})", f"p{int(q * 100)}{suffix}") for q in (0.5, 0.95, 0.99))


SERVICE = Dashboard(
    uid="appliance-overview",
    title="LLM appliance — service",
    variables=(("model", "label_values(appliance_worker_requests_total, model)"),),
    rows=(
        Row("Traffic and errors", (
            Panel("Requests/s by model", ((
                f"sum by (model) (rate(appliance_gateway_requests_total{{{API}, {MODEL}}}[{RI}]))", "{{model}}"),),
                "reqps"),
            Panel("Requests/s by route and status", (
                (f"sum by (route, status) (rate(appliance_gateway_requests_total[{RI}]))", "{{route}} {{status}}"),),
                "reqps"),
            Panel("5xx ratio (API routes)", ((
                f'sum(rate(appliance_gateway_requests_total{{{API}, status=~"5.."}}[{RI}])) '
                f"/ sum(rate(appliance_gateway_requests_total{{{API}}}[{RI}]))", "5xx"),), "percentunit"),
            Panel("Rate limited/s by limit", ((f"sum by (limit) (rate(appliance_gateway_rate_limited_total[{RI}]))",
                                               "{{limit}}"),), "reqps",
                  description="Per-API-key traffic is not in the metric contract; the gateway's usage API has it."),
            Panel("Worker rejections/s by reason", (
                (f"sum by (reason) (rate(appliance_worker_rejected_total[{RI}]))", "{{reason}}"),), "reqps"),
            Panel("Gateway dependencies up", ((
                "min by (dependency) (appliance_gateway_dependency_up)", "{{dependency}}"),), kind="stat"),
        )),
        Row("Latency", (
            Panel("End-to-end latency (gateway)", _quantiles("appliance_gateway_request_seconds", "", API), "s"),
            Panel("Time to first token", _quantiles("appliance_worker_ttft_seconds", "", MODEL), "s"),
            Panel("Inter-token latency", _quantiles("appliance_worker_inter_token_seconds", "", MODEL), "s"),
            Panel("Gateway overhead", _quantiles("appliance_gateway_overhead_seconds", ""), "s"),
            Panel("Upstream latency by worker (balancer)",
                  _quantiles("appliance_balancer_upstream_latency_seconds", "worker")[1:2], "s"),
            Panel("Balancer queue wait", _quantiles("appliance_balancer_queue_wait_seconds", ""), "s"),
        )),
        Row("Throughput and batching", (
            Panel("Generated tokens/s by model", (
                (f"sum by (model) (rate(appliance_worker_generated_tokens_total{{{MODEL}}}[{RI}]))", "{{model}}"),),
                "short"),
            Panel("Prompt tokens/s by model", (
                (f"sum by (model) (rate(appliance_worker_prompt_tokens_total{{{MODEL}}}[{RI}]))", "{{model}}"),),
                "short"),
            Panel("Prompt prefix hit rate", (
                (f"sum by (model) (rate(appliance_worker_prompt_tokens_reused_total{{{MODEL}}}[{RI}]))"
                 f" / sum by (model) (rate(appliance_worker_prompt_tokens_total{{{MODEL}}}[{RI}]))", "{{model}}"),),
                "percentunit", description="Share of prompt tokens taken from cached KV cells (prefix reuse) "
                "instead of being prefilled."),
            Panel("Prompt tokens/s prefilled and reused", (
                (f"sum(rate(appliance_worker_prompt_tokens_prefilled_total{{{MODEL}}}[{RI}]))", "prefilled"),
                (f"sum(rate(appliance_worker_prompt_tokens_reused_total{{{MODEL}}}[{RI}]))", "reused")), "short"),
            Panel("Gateway tokens/s by kind", (
                (f"sum by (kind) (rate(appliance_gateway_tokens_total{{{MODEL}}}[{RI}]))", "{{kind}}"),), "short"),
            Panel("Batch size (sequences per decode step)", (
                (f"sum(rate(appliance_worker_batch_size_sum[{RI}]))"
                 f" / sum(rate(appliance_worker_batch_size_count[{RI}]))", "mean"),
                *_quantiles("appliance_worker_batch_size", "")[1:2]), "short"),
        )),
        Row("Queues and workers", (
            Panel("Worker queue depth", ((f"sum by (instance) (appliance_worker_queue_depth{{{MODEL}}})",
                                          "{{instance}}"),), "short"),
            Panel("Balancer queue depth", (("sum(appliance_balancer_queue_depth)", "queued"),), "short"),
            Panel("Slots busy / total", (
                (f"sum by (instance) (appliance_worker_slots_busy{{{MODEL}}})", "busy {{instance}}"),
                (f"sum by (instance) (appliance_worker_slots_total{{{MODEL}}})", "total {{instance}}")), "short"),
            Panel("Worker health (balancer view)", (
                ("max by (worker, model) (appliance_balancer_worker_healthy)", "{{worker}}"),), kind="stat"),
            Panel("Workers scraped up", (('up{job="inference"}', "{{instance}}"),), kind="stat"),
            Panel("Balancer in-flight by worker", (("sum by (worker) (appliance_balancer_inflight)", "{{worker}}"),),
                  "short"),
            Panel("Balancer errors, ejections, retries/s", (
                (f"sum by (kind) (rate(appliance_balancer_errors_total[{RI}]))", "error {{kind}}"),
                (f"sum by (worker) (rate(appliance_balancer_ejections_total[{RI}]))", "ejected {{worker}}"),
                (f"sum(rate(appliance_balancer_retries_total[{RI}]))", "retries")), "short"),
            Panel("Balancer requests/s by worker", (
                (f"sum by (worker, status) (rate(appliance_balancer_requests_total[{RI}]))", "{{worker}} {{status}}"),),
                "reqps"),
        )),
        Row("Models and batches", (
            Panel("Requests/s by model (balancer)", (
                (f"sum by (model) (rate(appliance_balancer_model_requests_total[{RI}]))", "{{model}}"),), "reqps",
                description="Every request the balancer takes, loaded model or waiting for a swap host."),
            Panel("Model swaps/s and loads/s", (
                (f'sum by (from, to) (rate(appliance_balancer_model_swaps_total[{RI}]))', "swap {{from}} -> {{to}}"),
                (f"sum by (model) (rate(appliance_worker_model_loads_total[{RI}]))", "load {{model}}"),
                (f"sum by (model) (rate(appliance_worker_model_unloads_total[{RI}]))", "unload {{model}}"),
                (f"sum by (model) (rate(appliance_balancer_model_load_failures_total[{RI}]))", "failed {{model}}")),
                "short"),
            Panel("Swap wait and model load time", (
                *_quantiles("appliance_balancer_swap_wait_seconds", ""),
                (f"histogram_quantile(0.95, sum by (le, model) (rate(appliance_balancer_model_load_seconds_bucket"
                 f"[{RI}])))", "load p95 {{model}}")), "s",
                description="How long requests waited for their model on a swap host; how long a load took."),
            Panel("Prompt cache tokens/s restored after a swap", (
                (f"sum by (model) (rate(appliance_worker_prompt_cache_restored_tokens_total[{RI}]))", "{{model}}"),),
                "short"),
            Panel("Batch lines/s and tokens/s", (
                (f"sum by (outcome) (rate(appliance_gateway_batch_lines_total[{RI}]))", "lines {{outcome}}"),
                (f"sum by (kind) (rate(appliance_gateway_batch_tokens_total[{RI}]))", "tokens {{kind}}")), "short"),
            Panel("Tokens/s by priority, batch preemptions/s", (
                (f"sum by (priority, kind) (rate(appliance_worker_priority_tokens_total[{RI}]))",
                 "{{priority}} {{kind}}"),
                (f"sum by (kind) (rate(appliance_worker_preemptions_total[{RI}]))", "preempted {{kind}}")), "short",
                description="Batch work yields to chats: paused in its slot or evicted from it."),
        )),
        Row("Cache and RAG", (
            Panel("Response cache hit rate", (
                (f'sum(rate(appliance_gateway_cache_total{{result="hit"}}[{RI}])) '
                 f'/ sum(rate(appliance_gateway_cache_total{{result=~"hit|miss"}}[{RI}]))', "hit rate"),),
                "percentunit"),
            Panel("RAG ingested chunks/s", ((f"sum(rate(appliance_rag_ingested_chunks_total[{RI}]))", "chunks/s"),),
                  "short"),
            Panel("RAG documents, chunks, vectors", (
                ("sum by (collection) (appliance_rag_documents)", "docs {{collection}}"),
                ("sum by (collection) (appliance_rag_chunks)", "chunks {{collection}}"),
                ("sum by (collection) (appliance_rag_index_vectors)", "vectors {{collection}}")), "short"),
            Panel("RAG search latency", _quantiles("appliance_rag_search_seconds", ""), "s"),
            Panel("RAG embedding latency", _quantiles("appliance_rag_embed_seconds", ""), "s"),
        )),
        Row("Host", (
            Panel("Redis up", (("max(redis_up)", "redis"),), kind="stat"),
            Panel("Redis memory", (("sum(redis_memory_used_bytes)", "used"),), "bytes"),
            Panel("Free disk ratio", ((
                'node_filesystem_avail_bytes{fstype!~"tmpfs|overlay|squashfs|ramfs"} '
                '/ node_filesystem_size_bytes{fstype!~"tmpfs|overlay|squashfs|ramfs"}', "{{mountpoint}}"),),
                "percentunit"),
        )),
    ),
)

GPU = Dashboard(
    uid="appliance-gpu",
    title="LLM appliance — GPUs",
    rows=(
        Row("GPUs", (
            Panel("GPUs seen by NVML", (("sum(appliance_gpu_count)", "GPUs"),), kind="stat",
                  description="0 with appliance_gpu_nvml_available 0 means no NVIDIA driver or GPU on the host."),
            Panel("NVML available", (("min(appliance_gpu_nvml_available)", "nvml"),), kind="stat"),
            Panel("GPU utilisation", (("nvidia_smi_utilization_gpu_ratio", "{{uuid}}"),), "percentunit"),
            Panel("Memory controller utilisation", (("nvidia_smi_utilization_memory_ratio", "{{uuid}}"),),
                  "percentunit"),
            Panel("GPU memory used / total", (
                ("nvidia_smi_memory_used_bytes", "used {{uuid}}"),
                ("nvidia_smi_memory_total_bytes", "total {{uuid}}"),
                ("nvidia_smi_memory_free_bytes", "free {{uuid}}")), "bytes"),
            Panel("Temperature", (("nvidia_smi_temperature_gpu", "{{uuid}}"),), "celsius"),
            Panel("Power draw", (("nvidia_smi_power_draw_watts", "{{uuid}}"),), "watt"),
            Panel("Fan speed", (("nvidia_smi_fan_speed_ratio", "{{uuid}}"),), "percentunit"),
            Panel("GPU models", (("nvidia_smi_gpu_info", "{{index}} {{name}} (driver {{driver_version}})"),),
                  kind="table"),
        )),
    ),
)

DASHBOARDS = (SERVICE, GPU)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.exprs)
        ],
    }


def _variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "type": "query", "datasource": DATASOURCE, "query": {"query": query, "refId": name},
        "definition": query, "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def build(dashboard: Dashboard) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for row in dashboard.rows:
        panels.append({"id": len(panels) + 1, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        for i, panel in enumerate(row.panels):
            panels.append(_panel_json(panel, len(panels) + 1, (i % 3) * 8, y + (i // 3) * 8))
        y += ((len(row.panels) + 2) // 3) * 8
    return {
        "uid": dashboard.uid, "title": dashboard.title, "tags": ["llm-appliance"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [_variable(name, query) for name, query in dashboard.variables]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render(dashboard: Dashboard) -> str:
    return json.dumps(build(dashboard), indent=2, ensure_ascii=False) + "\n"


def write_all(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in DASHBOARDS:
        path = out / f"{dashboard.uid}.json"
        path.write_text(render(dashboard), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_all():
        sys.stdout.write(f"{written_path}\n")
