"""Retry budget arithmetic and the balancer's settings parsing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.core.settings import ConfigError, load_settings
from balancer.retry import RetryBudget
from balancer.settings import BalancerSettings


def test_budget_allows_the_burst_then_a_fraction_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, burst=3)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
    for _ in range(10):
        budget.deposit()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    assert (budget.granted, budget.refused) == (5, 2)


@given(requests=st.integers(0, 2000), ratio=st.floats(0, 1), burst=st.floats(0, 20))
def test_retries_never_exceed_burst_plus_ratio_of_requests(requests: int, ratio: float, burst: float) -> None:
    budget = RetryBudget(ratio=ratio, burst=burst)
    for _ in range(requests):
        budget.deposit()
        budget.try_spend()
        budget.try_spend()
    assert budget.granted <= burst + ratio * requests + 1e-6
    assert 0 <= budget.tokens <= max(burst, 0)


def test_workers_from_env_json_or_comma_separated(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setenv("APPLIANCE_BALANCER_WORKERS", "127.0.0.1:8201, http://127.0.0.1:8202/")
    assert load_settings(BalancerSettings).workers == ("http://127.0.0.1:8201", "http://127.0.0.1:8202")
    monkeypatch.setenv("APPLIANCE_BALANCER_WORKERS", '["http://a:1", "b:2"]')
    assert load_settings(BalancerSettings).workers == ("http://a:1", "http://b:2")
    for refused in ("ftp://nope", "https://a:1"):  # workers serve plain HTTP on the internal network
        monkeypatch.setenv("APPLIANCE_BALANCER_WORKERS", refused)
        with pytest.raises(ConfigError, match="APPLIANCE_BALANCER_WORKERS"):
            load_settings(BalancerSettings)


def test_the_worker_keepalive_stays_below_the_workers_own_idle_timeout(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setenv("APPLIANCE_BALANCER_WORKER_KEEPALIVE_S", "5")
    assert load_settings(BalancerSettings).worker_keepalive_s == 5.0
    monkeypatch.setenv("APPLIANCE_BALANCER_WORKER_KEEPALIVE_S", "75")  # aiohttp closes idle ones at 75 s
    with pytest.raises(ConfigError, match="APPLIANCE_BALANCER_WORKER_KEEPALIVE_S"):
        load_settings(BalancerSettings)


def test_entry_point_rejects_bad_config_with_one_message(tmp_path) -> None:
    env = {"APPLIANCE_BALANCER_STRATEGY": "fastest", "APPLIANCE_DATA_DIR": str(tmp_path), "PATH": ""}
    done = subprocess.run([sys.executable, "-m", "balancer"], check=False, env=env, capture_output=True, text=True,
                          timeout=60, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert done.returncode == 2
    assert "strategy" in done.stderr and "Traceback" not in done.stderr
