"""The benchmark harness: `appliance bench --list` lists benchmarks only; a service process is always stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.bench import harness
from appliance.bench.__main__ import main as bench_main


def test_list_shows_benchmarks_and_no_helper_module(capsys: pytest.CaptureFixture[str]) -> None:
    names = harness.benchmarks()
    assert {"balancer", "batching", "gateway", "rag"} <= set(names)
    assert not {"harness", "fake_worker", "_gateway_loadgen", "_balancer_roles"} & set(names)
    assert bench_main(["--list"]) == 0
    assert capsys.readouterr().out.split() == names
    assert bench_main(["harness"]) == 2  # a helper module is not a benchmark


def test_service_waits_for_readiness_and_stops_the_process(tmp_path: Path) -> None:
    port = harness.free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with harness.service(argv, log=tmp_path / "server.log", ready=f"http://127.0.0.1:{port}/", timeout=60) as running:
        assert harness.http_ok(f"http://127.0.0.1:{port}/")
    assert running.proc.poll() is not None  # stopped on exit
    assert harness.get_json(f"http://127.0.0.1:{port}/")[0] == 0  # nothing answers any more


def test_service_reports_a_process_that_exits_before_it_is_ready(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match="exited with 3"), \
            harness.service(argv, ready=lambda: False, timeout=60):
        pass


def test_wait_until_returns_how_long_it_took_and_gives_up_after_the_timeout() -> None:
    calls = iter([False, False, True])
    assert 0 <= harness.wait_until(lambda: next(calls), 5, "third poll", interval=0.01) < 5
    with pytest.raises(TimeoutError, match=r"never: not within 0\.05 s"):
        harness.wait_until(lambda: False, 0.05, "never", interval=0.01)


def test_emit_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert harness.emit({"ratio": 0.5}, as_json=True) == 0
    assert capsys.readouterr().out == '{"ratio": 0.5}\n'
    harness.emit({"ratio": 0.5}, as_json=False, render=lambda r: f"ratio = {r['ratio']}")
    assert capsys.readouterr().out == "ratio = 0.5\n"


def test_bench_help_goes_to_stderr() -> None:
    done = subprocess.run([sys.executable, "-m", "appliance.bench", "--help"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 2 and "gateway" in done.stderr and not done.stdout


def test_service_env_is_read_by_the_services_own_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a benchmark sets reaches the balancer's typed settings (names, JSON lists), and the machine's
    own config file stays out (an empty one is used)."""
    from balancer.settings import BalancerSettings

    env = harness.service_env("balancer", tmp_path / "data", "t" * 32, port=8123, workers=["http://a:1", "http://b:2"],
                              scheduling="fifo", interactive_headroom=0)
    assert (tmp_path / "data" / "empty.toml").read_text() == ""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = BalancerSettings()
    assert (settings.port, list(settings.workers), settings.scheduling) == (8123, ["http://a:1", "http://b:2"], "fifo")
    assert settings.interactive_headroom == 0


def test_run_json_returns_the_one_object_a_process_prints_and_refuses_anything_else(tmp_path: Path) -> None:
    """How a benchmark reads a reference measured in its own process (``python -m appliance.bench._rag_reference``)."""
    log = tmp_path / "one-shot.log"
    printed = "import sys; sys.stderr.write('progress\\n'); print('{\"rate\": 2.5}')"
    assert harness.run_json([sys.executable, "-c", printed], log=log) == {"rate": 2.5}
    assert log.read_text() == "progress\n"  # stderr to the log, stdout parsed
    with pytest.raises(RuntimeError, match="exited with 3"):
        harness.run_json([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="not one JSON object"):
        harness.run_json([sys.executable, "-c", "print('[1, 2]')"])
    with pytest.raises(RuntimeError, match="not one JSON object"):
        harness.run_json([sys.executable, "-c", "print('rate: 2.5')"])
    with pytest.raises(RuntimeError, match="no answer after 1 s"):
        harness.run_json([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
