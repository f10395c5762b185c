"""The pip-audit gate: vulnerabilities fail, an audit that audited nothing never reads as clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.pip_audit_gate import ignored_ids, judge

VULN = {"name": "jinja2", "version": "3.1.2", "vulns": [{"id": "GHSA-h5c8-rqwp-cp95", "fix_versions": ["3.1.3"]}]}
CLEAN = {"name": "httpx", "version": "0.28.1", "vulns": []}
SKIPPED = {"name": "yarl", "skip_reason": "Dependency not found on PyPI and could not be audited: yarl (1.25.1)"}


def test_a_vulnerability_fails() -> None:
    code, lines = judge({"dependencies": [CLEAN, VULN]}, require_audit=False)
    assert code == 1 and "GHSA-h5c8-rqwp-cp95" in "\n".join(lines)


def test_unaudited_packages_are_reported_and_fail_when_required() -> None:
    code, lines = judge({"dependencies": [SKIPPED, SKIPPED]}, require_audit=False)
    assert code == 0 and "0 of 2 packages audited" in lines[0] and "NOT AUDITED" in lines[-1]
    assert judge({"dependencies": [SKIPPED]}, require_audit=True)[0] == 1
    assert judge({"dependencies": [CLEAN]}, require_audit=True)[0] == 0


def test_ignore_file_needs_a_reason(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("# comment\n\nGHSA-aaaa-bbbb-cccc  # somepkg: only the CLI is affected, not installed\n")
    assert ignored_ids(good) == ["GHSA-aaaa-bbbb-cccc"]
    bad = tmp_path / "bad.txt"
    bad.write_text("PYSEC-2024-1\n")
    with pytest.raises(SystemExit, match="needs a reason"):
        ignored_ids(bad)


def test_the_repository_ignore_file_parses() -> None:
    assert isinstance(ignored_ids(), list)
