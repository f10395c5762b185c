"""What `appliance status` reports: services, workers, Redis, RAG, GPU, cache — gathered, not guessed."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from appliance.core.hop import INTERNAL_TOKEN_HEADER
from appliance.runtime.budget import human_bytes
from appliance.runtime.local.supervisor_client import SupervisorUnavailable
from appliance.runtime.plan import Program
from appliance.runtime.protocol import DEGRADED, DOWN, HEALTHY, ServiceRow, Status

if TYPE_CHECKING:
    from appliance.runtime.local.runtime import LocalRuntime

__all__ = ["collect_status", "gpu_summary", "status_of"]


def _restarts(log: Path, name: str) -> int:
    if not log.is_file():
        return 0
    pattern = re.compile(rf"exited: {re.escape(name)} \(")
    with log.open(errors="replace") as handle:
        return sum(1 for line in handle if pattern.search(line))


def _services(runtime: LocalRuntime, plan: list[Program]) -> list[dict[str, Any]]:
    infos = {info["name"]: info for info in runtime.supervisor.processes()}
    log = runtime.settings.log_dir / "supervisord.log"
    rows = []
    for program in plan:
        if program.standby and infos.get(program.name, {}).get("statename") != "RUNNING":
            continue  # a stand-in, shown only while `appliance upgrade` runs it
        info = infos.get(program.name, {})
        state = info.get("statename", "ABSENT")
        probe = runtime.probe(program) if state == "RUNNING" else None
        started = info.get("start") or 0
        rows.append(
            {
                "name": program.name,
                "state": state.lower(),
                "pid": info.get("pid") or None,
                "uptime_s": round(time.time() - started) if state == "RUNNING" and started else 0,
                "restarts": _restarts(log, program.name),
                "healthy": bool(probe and probe.ok),
                "health": (probe.body if probe and probe.ok else (probe.error or probe.status) if probe else None),
            }
        )
    return rows


def _redis(port: int, login: dict[str, Any]) -> dict[str, Any]:
    import redis

    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, **login)
        info = client.info()
        persistence = client.info("persistence")
        client.close()
    except redis.RedisError as exc:
        return {"up": False, "error": type(exc).__name__}
    return {
        "up": True,
        "used_memory_bytes": info.get("used_memory"),
        "used_memory_human": info.get("used_memory_human"),
        "keys": sum(v.get("keys", 0) for k, v in info.items() if k.startswith("db") and isinstance(v, dict)),
        "last_save": persistence.get("rdb_last_save_time"),
        "aof_enabled": bool(persistence.get("aof_enabled")),
    }


def _rag(port: int, token: str) -> dict[str, Any]:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/collections", headers={INTERNAL_TOKEN_HEADER: token}, timeout=3)
        response.raise_for_status()
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"up": False, "error": type(exc).__name__}
    collections: list[dict[str, Any]] = (
        body.get("data") or body.get("collections") or [] if isinstance(body, dict) else list(body)
    )
    return {
        "up": True,
        "collections": len(collections),
        "documents": sum(int(c.get("documents", 0)) for c in collections),
        "chunks": sum(int(c.get("chunks", 0)) for c in collections),
    }


def gpu_summary() -> dict[str, Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # NVML missing or no driver: that is "no GPU", not an error
        return {"present": False, "reason": type(exc).__name__}
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            gpus.append(
                {
                    "index": index,
                    "name": pynvml.nvmlDeviceGetName(handle),
                    "utilization": util.gpu / 100,
                    "memory_used_bytes": memory.used,
                    "memory_total_bytes": memory.total,
                }
            )
        return {"present": bool(gpus), "gpus": gpus}
    finally:
        pynvml.nvmlShutdown()


def _cache_hit_rate(gateway_url: str) -> float | None:
    try:
        text = httpx.get(f"{gateway_url}/metrics", timeout=3, verify=False).text  # noqa: S501 - loopback
    except httpx.HTTPError:
        return None
    counts = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^appliance_gateway_cache_total\{[^}]*result="(\w+)"[^}]*\} ([0-9.e+]+)$', text, re.M)
    }
    lookups = counts.get("hit", 0.0) + counts.get("miss", 0.0)
    return round(counts.get("hit", 0.0) / lookups, 4) if lookups else None


def _models(runtime: LocalRuntime, workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each catalogue model: resident or on demand, its state (the balancer's, contract C3), the memory one
    worker of it needs, and the worker programs holding it now."""
    from appliance.runtime.local.models import list_models  # (it imports the runtime)
    from appliance.runtime.protocol import RuntimeFailure

    try:
        rows = list_models(runtime)
    except RuntimeFailure as exc:
        return [{"error": str(exc)}]
    return [
        {"model": row.alias, "resident": row.resident, "pinned": row.pinned, "state": row.state,
         "memory_bytes": row.memory_bytes,
         "workers": [w["name"] for w in workers if w.get("model") == row.alias and w.get("healthy")]}
        for row in rows
    ]


def collect_status(runtime: LocalRuntime) -> tuple[int, dict[str, Any]]:
    settings = runtime.settings
    if not runtime.supervisor.alive():
        return DOWN, {"state": "down", "services": []}
    plan = runtime.plan()
    try:
        services = _services(runtime, plan)
    except SupervisorUnavailable:
        return DOWN, {"state": "down", "services": []}
    workers = [
        {"name": s["name"], **(s["health"] if isinstance(s["health"], dict) else {}), "healthy": s["healthy"]}
        for s in services
        if s["name"].startswith("inference-")
    ]
    report: dict[str, Any] = {
        "services": services,
        "workers": workers,
        "redis": _redis(settings.redis_port, settings.redis_admin_login()),
        "rag": _rag(settings.rag_port, settings.resolved_internal_token()) if settings.with_rag else None,
        "gpu": gpu_summary(),
        "cache_hit_rate": _cache_hit_rate(settings.gateway_local_url),
    }
    report["models"] = _models(runtime, workers)
    healthy = [s["healthy"] for s in services]
    gateway_ok = any(s["healthy"] for s in services if s["name"] == "gateway")
    code = HEALTHY if all(healthy) else (DEGRADED if gateway_ok and any(w["healthy"] for w in workers) else DOWN)
    report["state"] = {HEALTHY: "healthy", DEGRADED: "degraded", DOWN: "down"}[code]
    return code, report


def status_of(runtime: LocalRuntime) -> Status:
    """`appliance status`: the report, and its table (processes) and lines (workers, Redis, RAG, GPU, cache)."""
    code, report = collect_status(runtime)
    rows = tuple(
        ServiceRow(
            s["name"],
            s["healthy"],
            {
                "state": s["state"],
                "pid": str(s["pid"] or "-"),
                "uptime": f"{s['uptime_s']}s",
                "restarts": str(s["restarts"]),
                "health": "ok" if s["healthy"] else str(s["health"]),
            },
        )
        for s in report["services"]
    )
    lines = [
        f"  {w['name']}: model={w.get('model')} slots={w.get('slots_busy')}/{w.get('slots_total')} "
        f"queue={w.get('queue_depth')} ctx/slot={w.get('n_ctx')} layers on GPU={w.get('gpu_layers')}"
        f" decode={(w.get('decode') or {}).get('mode', '-')}"  # the worker's decode mode (issue 31)
        for w in report.get("workers", [])
    ]
    lines += [
        f"  model {m['model']}: {m['resident']}{' (pinned)' if m['pinned'] else ''}, state={m['state']}, "
        f"workers={','.join(m['workers']) or '-'}, memory per worker={human_bytes(m['memory_bytes'])}"
        for m in report.get("models", []) if "model" in m
    ]
    redis_info, rag, gpu = report.get("redis") or {}, report.get("rag") or {}, report.get("gpu") or {}
    lines.append(
        f"  redis: up={redis_info.get('up')} memory={redis_info.get('used_memory_human')} "
        f"last_save={redis_info.get('last_save')}"
    )
    if rag:
        lines.append(f"  rag: up={rag.get('up')} collections={rag.get('collections')} documents={rag.get('documents')}")
    lines.append(f"  gpu: {gpu.get('gpus') if gpu.get('present') else 'none'}")
    lines.append(f"  cache hit rate: {report.get('cache_hit_rate')}")
    return Status(code, report, ("state", "pid", "uptime", "restarts", "health"), rows, lines=tuple(lines))
