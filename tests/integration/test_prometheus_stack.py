"""The observability config against the running local stack.

Each service of the tree is started as its own process on loopback (``python -m
<package>``, the exporters from their Debian binaries), then:

* every metric name the dashboards and alert rules use must be on the /metrics
  page of the process that owns it (names come from parsing the PromQL, not
  from a hand-kept list);
* a real Prometheus scrapes them all, with the real alert rules loaded, and
  finds every target up, the key series present and the rules healthy.

A service whose package is not in the tree yet is skipped with that reason.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.bench.harness import wait_until
from tests.support.processes import REPO, free_port, run_service
from tests.support.promql import exported_names, owner_of, used_metric_names
from tests.support.scrape_targets import SPECS, ScrapeTargets

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScrapeTargets]:
    with ExitStack() as exits:
        yield ScrapeTargets(request, tmp_path_factory.mktemp("obs-stack"), exits)


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        return str(response.read().decode())


USED = used_metric_names()


@pytest.mark.parametrize("owner", sorted(SPECS))
def test_every_metric_the_dashboards_and_rules_use_is_exported(stack: ScrapeTargets, owner: str) -> None:
    names = {name: places for name, places in USED.items() if owner_of(name) == owner}
    assert names, f"nothing in the dashboards or rules reads from {owner}"
    exposed = exported_names(fetch(f"{stack.url(owner)}/metrics"))
    missing = {name: sorted(places) for name, places in names.items() if name not in exposed}
    assert not missing, f"{owner} does not export: {json.dumps(missing, indent=1)}"


def _prometheus_config(stack: ScrapeTargets, rules: Path) -> tuple[dict[str, Any], list[str]]:
    jobs, skipped = [], []
    for name, spec in SPECS.items():
        if spec.available():
            skipped.append(f"{name}: {spec.available()}")
            continue
        target = stack.url(name).removeprefix("http://")
        jobs.append({"job_name": spec.job, "static_configs": [{"targets": [target]}]})
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
              "rule_files": [str(rules)], "scrape_configs": jobs}
    return config, skipped


def _api(base: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    body = json.loads(fetch(f"{base}/api/v1/{path}{query}"))
    assert body["status"] == "success", body
    return body["data"]


def test_real_prometheus_scrapes_every_target_and_evaluates_the_rules(stack: ScrapeTargets, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not installed: apt-get install prometheus (scripts/debian-packages.txt)")
    config, skipped = _prometheus_config(stack, REPO / "observability" / "rules" / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"]
    with run_service(argv, env={}, log_path=tmp_path / "prometheus.log", ready_url=f"{base}/-/ready", ready_timeout=30):

        def all_up() -> bool:
            targets = _api(base, "targets")["activeTargets"]
            return len(targets) == len(config["scrape_configs"]) and all(t["health"] == "up" for t in targets)

        wait_until(all_up, 30, "every target up", interval=0.5)
        for name, spec in SPECS.items():
            if spec.available():
                continue
            assert _api(base, "query", query=f'up{{job="{spec.job}"}}')["result"][0]["value"][1] == "1", name
            for series in spec.key_series:
                wait_until(lambda s=series: bool(_api(base, "query", query=s)["result"]), 10, f"{series} from {name}",
                           interval=0.5)

        def rules_evaluated() -> bool:
            groups = _api(base, "rules")["groups"]
            return all(rule.get("lastEvaluation", "0001").startswith("20") for g in groups for rule in g["rules"])

        wait_until(rules_evaluated, 30, "one evaluation of every rule", interval=0.5)
        rules = [rule for group in _api(base, "rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} >= {"WorkerDown", "RedisDown", "GPUHot", "DiskAlmostFull"}
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    healthy_stack_alerts = {r["name"]: r["state"] for r in rules if r["name"] in {"WorkerDown", "AllWorkersDown",
                                                                                    "RedisDown"}}
    assert set(healthy_stack_alerts.values()) == {"inactive"}, healthy_stack_alerts
    if skipped:
        pytest.skip(f"checked without: {'; '.join(skipped)}")
