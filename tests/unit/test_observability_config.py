"""Prometheus config, alert rules (promtool), Alertmanager (amtool), Grafana dashboards and provisioning."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from observability import dashboards
from tests.support.promql import metric_names, owner_of, used_metric_names

REPO = Path(__file__).resolve().parents[2]
OBS = REPO / "observability"
ALERTS = {"WorkerDown", "AllWorkersDown", "RedisDown", "QueueSaturated", "HighErrorRate", "GPUMemoryHigh",
          "GPUHot", "DiskAlmostFull"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not installed: apt-get install prometheus prometheus-alertmanager "
                    "(scripts/debian-packages.txt)")
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_check_config() -> None:
    result = run(tool("promtool"), "check", "config", str(OBS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = run(tool("promtool"), "test", "rules", str(OBS / "rules_tests" / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rule_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The rule tests can fail: raise GPUHot's threshold and they must."""
    (tmp_path / "rules").mkdir()
    rules = (OBS / "rules" / "alerts.yml").read_text()
    assert "nvidia_smi_temperature_gpu > 85" in rules
    (tmp_path / "rules" / "alerts.yml").write_text(rules.replace("nvidia_smi_temperature_gpu > 85",
                                                                 "nvidia_smi_temperature_gpu > 95"))
    (tmp_path / "tests").mkdir()
    shutil.copy(OBS / "rules_tests" / "alerts_test.yml", tmp_path / "tests" / "alerts_test.yml")
    result = run(tool("promtool"), "test", "rules", str(tmp_path / "tests" / "alerts_test.yml"))
    assert result.returncode != 0
    assert "GPUHot" in result.stdout + result.stderr


def test_every_required_alert_exists_with_severity_and_summary() -> None:
    document = yaml.safe_load((OBS / "rules" / "alerts.yml").read_text())
    rules = {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}
    assert set(rules) >= ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
    tested = (OBS / "rules_tests" / "alerts_test.yml").read_text()
    assert all(f"alertname: {name}" in tested for name in ALERTS)


def test_alertmanager_config_is_valid_and_routes_to_a_receiver() -> None:
    result = run(tool("amtool"), "check-config", str(OBS / "alertmanager" / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((OBS / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {receiver["name"] for receiver in config["receivers"]}
    assert config["route"]["receiver"] in receivers


def test_prometheus_scrapes_every_service_of_the_stack() -> None:
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"gateway", "balancer", "inference", "rag", "redis", "node", "gpu-exporter"} <= set(jobs)
    targets = {t for job in jobs.values() for sc in job["static_configs"] for t in sc["targets"]}
    assert {"gpu-exporter:9835", "rag:8300", "balancer:8100", "gateway:8000"} <= targets
    # compose.yaml is the CPU profile; compose.gpu.yaml adds the GPU exporter (and Grafana).
    services = {name for file in ("compose.yaml", "compose.gpu.yaml")
                for name in yaml.safe_load((REPO / file).read_text())["services"]}
    hosts = {target.split(":")[0] for target in targets} - {"localhost"}
    assert hosts <= services, "every scrape target is a compose service"


def test_committed_dashboards_are_what_the_generator_builds(tmp_path: Path) -> None:
    written = dashboards.write_all(tmp_path)
    for path in written:
        committed = OBS / "grafana" / "dashboards" / path.name
        assert committed.read_text() == path.read_text(), f"run python -m observability.dashboards ({path.name})"
    assert {p.name for p in written} == {p.name for p in (OBS / "grafana" / "dashboards").glob("*.json")}


def test_dashboards_cover_the_issue_and_use_the_provisioned_datasource() -> None:
    datasource = yaml.safe_load((OBS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    used = used_metric_names()
    for needed in ("appliance_gateway_requests_total", "appliance_worker_ttft_seconds_bucket",
                   "appliance_worker_inter_token_seconds_bucket", "appliance_gateway_request_seconds_bucket",
                   "appliance_worker_generated_tokens_total", "appliance_worker_batch_size_bucket",
                   "appliance_worker_queue_depth", "appliance_balancer_worker_healthy", "appliance_gateway_cache_total",
                   "appliance_rag_ingested_chunks_total", "appliance_rag_search_seconds_bucket",
                   "nvidia_smi_utilization_gpu_ratio", "nvidia_smi_memory_used_bytes", "nvidia_smi_temperature_gpu",
                   "nvidia_smi_power_draw_watts"):
        assert needed in used, needed
    for path in (OBS / "grafana" / "dashboards").glob("*.json"):
        document = json.loads(path.read_text())
        ids = [panel["id"] for panel in document["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in document["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
    provider = yaml.safe_load((OBS / "grafana/provisioning/dashboards/appliance.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_used_metric_has_a_known_exporter() -> None:
    unknown = {name: places for name, places in used_metric_names().items() if owner_of(name) is None}
    assert not unknown, f"metric names no exporter of the stack owns: {unknown}"


@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.95, sum by (le, model) (rate(appliance_worker_ttft_seconds_bucket{model=~"$model"}'
     "[$__rate_interval])))", {"appliance_worker_ttft_seconds_bucket"}),
    ('up{job="inference"} == 0 or max by (worker, model) (appliance_balancer_worker_healthy) == 0',
     {"up", "appliance_balancer_worker_healthy"}),
    ("label_values(appliance_worker_requests_total, model)", {"appliance_worker_requests_total"}),
    ("sum(rate(a_total[5m] offset 1h)) / on(instance) group_left(model, job) b > bool 1e3 unless c",
     {"a_total", "b", "c"}),
    ('count_values("value", x{le="0.5"}) and ignoring(le) y', {"x", "y"}),
    ("nvidia_smi_memory_used_bytes / nvidia_smi_memory_total_bytes > 0.95",
     {"nvidia_smi_memory_used_bytes", "nvidia_smi_memory_total_bytes"}),
])
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


NAME = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True).filter(
    lambda n: n not in {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"})
LABEL = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)


@given(metrics=st.lists(NAME, min_size=1, max_size=4, unique=True), labels=st.lists(LABEL, min_size=1, max_size=3),
       value=st.text(alphabet="abc{}()[] ,=~", max_size=8))
def test_label_names_and_values_are_never_taken_for_metrics(metrics: list[str], labels: list[str], value: str) -> None:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    selectors = [f'{m}{{{labels[0]}="{escaped}"}}[5m]' for m in metrics]
    expr = " + ".join(f"sum by ({', '.join(labels)}) (rate({s}))" for s in selectors)
    assert metric_names(expr) == set(metrics)
