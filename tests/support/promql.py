"""Which metric names the dashboards and alert rules use, and which names a /metrics page exports.

Expressions are parsed by ``promql-parser`` (Prometheus's grammar); before that, what Grafana adds to PromQL
is reduced to PromQL: ``label_values(METRIC, label)`` to ``METRIC`` and a ``$variable`` range to ``[5m]``
(variables inside label matchers are plain strings to the parser).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "OWNERS",
    "dashboard_expressions",
    "exported_names",
    "metric_names",
    "owner_of",
    "rule_expressions",
    "used_metric_names",
]

OBSERVABILITY = Path(__file__).resolve().parents[2] / "observability"

_LABEL_VALUES = re.compile(r"^\s*label_values\s*\(\s*(.*?)\s*(?:,\s*[A-Za-z_][A-Za-z0-9_]*\s*)?\)\s*$", re.DOTALL)
_GRAFANA_RANGE = re.compile(r"\[\s*\$\{?\w+\}?\s*\]")

# Which process exports a name, by prefix: the tests start that process and scrape it.
OWNERS: tuple[tuple[str, str], ...] = (
    ("appliance_worker_", "inference"),
    ("appliance_balancer_", "balancer"),
    ("appliance_gateway_", "gateway"),
    ("appliance_rag_", "rag"),
    ("appliance_gpu_", "gpu_exporter"),
    ("nvidia_smi_", "gpu_exporter"),
    ("redis_", "redis_exporter"),
    ("node_", "node_exporter"),
)
# Series Prometheus makes itself for every scrape.
_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"}


def owner_of(name: str) -> str | None:
    """The exporter a metric name belongs to; ``prometheus`` for synthetic series; None if unknown."""
    if name in _SYNTHETIC:
        return "prometheus"
    return next((owner for prefix, owner in OWNERS if name.startswith(prefix)), None)


def metric_names(expr: str) -> set[str]:
    """The metric names one PromQL expression (or Grafana query) selects."""
    text = _GRAFANA_RANGE.sub("[5m]", _LABEL_VALUES.sub(r"\1", expr))
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers
                         if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal)
        return True

    promql_parser.walk(promql_parser.parse(text), visit)
    return names


def rule_expressions(path: Path) -> Iterator[tuple[str, str]]:
    """(rule name, expr) for every alerting/recording rule in a Prometheus rules file."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    for group in document.get("groups", []):
        for rule in group.get("rules", []):
            yield rule.get("alert") or rule.get("record", "?"), str(rule["expr"])


def _walk_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def dashboard_expressions(path: Path) -> Iterator[tuple[str, str]]:
    """(panel or variable title, expr) for every Prometheus query in a Grafana dashboard JSON."""
    document = json.loads(path.read_text(encoding="utf-8"))
    for panel in _walk_panels(document.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield str(panel.get("title", "?")), str(target["expr"])
    for variable in document.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            yield f"${variable.get('name')}", str(query)


def used_metric_names(root: Path = OBSERVABILITY) -> dict[str, set[str]]:
    """Every metric name used under ``root`` → where it is used (file: rule or panel)."""
    used: dict[str, set[str]] = {}
    sources: list[tuple[Path, Iterator[tuple[str, str]]]] = []
    sources += [(p, rule_expressions(p)) for p in sorted((root / "rules").glob("*.yml"))]
    sources += [(p, dashboard_expressions(p)) for p in sorted((root / "grafana" / "dashboards").glob("*.json"))]
    recorded: set[str] = set()
    for path, expressions in sources:
        for where, expr in expressions:
            for name in metric_names(expr):
                used.setdefault(name, set()).add(f"{path.name}: {where}")
    for path in sorted((root / "rules").glob("*.yml")):
        recorded |= {name for name, _ in rule_expressions(path) if not name[:1].isupper()}
    return {name: places for name, places in used.items() if name not in recorded}


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_names(exposition: str) -> set[str]:
    """Every sample name a /metrics page can carry, including declared families with no sample yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names
