"""The stack verbs, written once against the Runtime protocol, driven through the CLI with a recording runtime.

The real runtimes run in tests/e2e/test_runtime_lifecycle.py (local) and test_compose_appliance.py (compose);
here the CLI's own part: what it passes down, what it prints, what it remembers, how failures read
(tests/support/recording_runtime.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cli.context import state_file
from appliance.runtime.protocol import DEGRADED
from tests.support.recording_runtime import RecordingRuntime, invoke


@pytest.fixture
def made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[RecordingRuntime]:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "empty.toml"))
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NO_COLOR", "1")
    return []


def test_up_passes_its_flags_down_prints_what_the_runtime_reports_and_remembers_them(
    made: list[RecordingRuntime],
) -> None:
    code, stdout, stderr = invoke(made, "up", "--workers", "3", "--json")
    assert code == 0 and made[0].settings.workers == 3 and made[0].calls == [("up", ())]
    report = json.loads(stdout)
    assert report["openai_base_url"] == "http://gw/v1" and report["healthy_in_s"] == 1.5
    assert "listen" not in report  # a runtime that does not choose the listen address does not report one
    assert "Starting the test stack (3 workers)" in stderr and "one note" in stderr
    assert json.loads(state_file(made[0].settings).read_text())["workers"] == 3
    invoke(made, "status")
    assert made[1].settings.workers == 3  # a later verb runs with what `up` was told


def test_a_refusal_is_one_sentence_and_remembers_nothing(made: list[RecordingRuntime]) -> None:
    code, _, stderr = invoke(made, "up", "--workers", "5", failure="compose.yaml defines 2 workers")
    assert code == 1 and stderr.splitlines()[-1] == "error: compose.yaml defines 2 workers"
    assert not state_file(made[0].settings).exists()


def test_status_prints_the_runtimes_table_and_exits_with_its_code(made: list[RecordingRuntime]) -> None:
    code, stdout, stderr = invoke(made, "status")
    assert code == DEGRADED and "one is late" in stderr
    assert "appliance: degraded" in stdout and "inference-1" in stdout and "loading" in stdout
    assert stdout.rstrip().endswith("more")
    code, stdout, _ = invoke(made, "status", "--json")
    assert code == DEGRADED and json.loads(stdout)["state"] == "degraded"


def test_verbs_reach_the_runtime_with_their_arguments(made: list[RecordingRuntime]) -> None:
    assert invoke(made, "restart", "inference", "--allow-outage")[2].strip() == "Restarted: nothing was running"
    code, _, stderr = invoke(made, "scale", "inference=3")
    assert code == 0 and "Scaled to 3 workers (added: inference-3, removed: none)" in stderr
    assert json.loads(state_file(made[1].settings).read_text())["workers"] == 3
    assert "Upgraded: inference-1, gateway" in invoke(made, "upgrade")[2]
    invoke(made, "logs", "gateway", "-n", "5")
    assert "Stopped (the data stays)." in invoke(made, "down")[2]
    assert [r.calls[0] for r in made] == [
        ("restart", ("inference", True)),
        ("scale", (3,)),
        ("upgrade", (False,)),
        ("logs", ("gateway", False, 5)),
        ("down", ()),
    ]


def test_scheduled_backups_are_refused_where_the_runtime_does_not_run_them(made: list[RecordingRuntime]) -> None:
    code, _, stderr = invoke(made, "backup", "--every", "6h")
    assert code == 1 and "--every and --offsite are for the local runtime" in stderr
    assert made[0].calls == []
    code, stdout, _ = invoke(made, "backup", "--json")
    assert code == 0 and json.loads(stdout)["archive"] == "a.tar.gz"
