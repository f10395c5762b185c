"""Under CI=true or ./scripts/test a missing dependency fails the run; only a GPU may be skipped (issue 21)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.support import strict
from tests.support.processes import REPO

BROWSER_TEST = "tests/browser/test_chat_ui.py::test_sign_in_rejects_a_bad_key_then_accepts_a_good_one"


def _run_without_chromium(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "APPLIANCE_TEST_STRICT")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", BROWSER_TEST],
        cwd=REPO,
        env={**clean, "APPLIANCE_TEST_CHROMIUM": "/nonexistent/chromium", **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.parametrize("env", [{"CI": "true"}, {"APPLIANCE_TEST_STRICT": "1"}], ids=["CI", "scripts-test"])
def test_a_missing_chromium_fails_in_ci_and_scripts_test(env: dict[str, str]) -> None:
    result = _run_without_chromium(**env)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 error" in result.stdout and "chromium is not installed" in result.stdout, result.stdout[-2000:]


def test_a_missing_chromium_is_a_skip_on_a_developer_machine() -> None:
    result = _run_without_chromium()
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize(
    ("reason", "fails"),
    [
        ("no GPU visible (nvidia-smi not found)", False),
        ("CUDA is not available", False),
        ("prometheus not installed", True),
        ("could not import 'playwright.sync_api': No module named 'playwright'", True),
    ],
)
def test_only_a_gpu_may_be_a_skip_reason(monkeypatch: pytest.MonkeyPatch, reason: str, fails: bool) -> None:
    monkeypatch.setattr(strict, "STRICT", True)
    report = SimpleNamespace(skipped=True, outcome="skipped", longrepr=("file.py", 1, f"Skipped: {reason}"))
    report.skipped = True
    strict.fail_strict_skip(report)
    assert (report.outcome == "failed") is fails
