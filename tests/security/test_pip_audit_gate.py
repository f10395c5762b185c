"""The pip-audit gate: vulnerabilities fail, an audit that audited nothing never reads as clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.pip_audit_gate import complete_with_project_json, ignored_ids, judge

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


def _project(version: str, *vulns: dict[str, object]) -> dict[str, object]:
    return {"info": {"version": version}, "vulnerabilities": list(vulns)}


ADVISORY = {"id": "GHSA-xxxx-yyyy-zzzz", "aliases": ["CVE-2099-1"], "fixed_in": [], "withdrawn": None}


def test_skipped_packages_at_the_latest_release_are_audited_from_the_project_json() -> None:
    # The injected fetch stands in for pypi.org (the one network call); everything else is the real gate.
    projects = {
        "yarl": _project("1.25.1"),
        "diskcache": _project("5.6.3", ADVISORY),
        "numpy": _project("2.5.5", ADVISORY),
        "gone": None,
    }
    skipped = [
        {"name": n, "skip_reason": f"Dependency not found on PyPI and could not be audited: {n} ({v})"}
        for n, v in [("yarl", "1.25.1"), ("diskcache", "5.6.3"), ("numpy", "2.4.6"), ("gone", "1.0")]
    ]
    editable = {"name": "llm-appliance", "skip_reason": "distribution marked as editable"}
    report = complete_with_project_json({"dependencies": [*skipped, editable]}, [], projects.get)
    code, lines = judge(report, require_audit=False)
    text = "\n".join(lines)
    assert code == 1 and "VULNERABLE diskcache 5.6.3: GHSA-xxxx-yyyy-zzzz" in text
    assert "2 of 4 packages audited" in lines[0]  # the editable project itself is not counted
    assert "numpy 2.4.6" in text and "gone" in text and "llm-appliance" not in text
    # an ignored advisory (by id or by alias) no longer fails the gate
    report = complete_with_project_json({"dependencies": skipped}, ["CVE-2099-1"], projects.get)
    assert judge(report, require_audit=False)[0] == 0
    assert judge(report, require_audit=True)[0] == 1  # numpy and "gone" are still unaudited
