"""Prometheus configuration for the local runtime: every service on loopback."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.runtime.settings import RuntimeSettings

__all__ = ["WORKER_TARGETS_FILE", "render_prometheus_conf", "render_worker_targets", "scrape_targets"]

# Workers come and go with `appliance scale`: Prometheus reads them from this file (file-based service
# discovery, re-read when it changes) so a scale never needs a Prometheus reload or restart.
WORKER_TARGETS_FILE = "prometheus-workers.json"


def scrape_targets(settings: RuntimeSettings) -> dict[str, list[str]]:
    workers = [f"127.0.0.1:{settings.worker_port(i)}" for i in range(1, settings.workers + 1)]
    targets = {
        "gateway": [settings.gateway_local_url.split("://", 1)[1]],
        "balancer": [f"127.0.0.1:{settings.balancer_port}"],
        "inference": workers,
        "gpu-exporter": [f"127.0.0.1:{settings.exporter_port}"],
    }
    if settings.with_rag:
        targets["rag"] = [f"127.0.0.1:{settings.rag_port}"]
    return targets


def render_worker_targets(settings: RuntimeSettings) -> str:
    """The file_sd document listing the current workers."""
    return json.dumps([{"targets": scrape_targets(settings)["inference"], "labels": {}}], indent=2) + "\n"


def render_prometheus_conf(settings: RuntimeSettings, repo: Path) -> str:
    """YAML is a superset of JSON: emit JSON so no YAML library is needed to write it."""
    rules = sorted(str(p) for p in (repo / "observability" / "rules").glob("*.yml") if not p.name.endswith("_test.yml"))
    scheme = "https" if settings.tls else "http"
    jobs = []
    for job, targets in scrape_targets(settings).items():
        entry: dict[str, object] = {"job_name": job, "static_configs": [{"targets": targets}]}
        if job == "inference":
            files = [str((settings.run_dir / WORKER_TARGETS_FILE).resolve())]
            entry = {"job_name": job, "file_sd_configs": [{"files": files, "refresh_interval": "5s"}]}
        if job == "gateway" and scheme == "https":
            entry["scheme"] = "https"
            entry["tls_config"] = {"insecure_skip_verify": True}
        jobs.append(entry)
    config = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "15s"},
        "rule_files": rules,
        "scrape_configs": jobs,
    }
    return json.dumps(config, indent=2) + "\n"
