"""Run pip-audit on the installed environment and judge its report honestly.

- Any known vulnerability not in ``scripts/pip-audit-ignore.txt`` → exit 1.
- Packages pip-audit could not look up (no route to the vulnerability service, a proxy that
  serves PyPI's project JSON but not the per-version one pip-audit asks for) get a second
  chance: PyPI's project endpoint (``/pypi/<name>/json``) lists the advisories of the project's
  *latest* release, so a package installed at exactly that release is audited from it. What is
  still unaudited is named and counted: an audit that audited nothing must never read as
  "no known vulnerability". By default that is a loud warning (exit 0) so an offline build still
  runs its tests; ``APPLIANCE_REQUIRE_PIP_AUDIT=1`` (CI with network) turns it into a failure.

Usage: ``python scripts/pip_audit_gate.py`` (from ./scripts/test).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

IGNORE_FILE = Path(__file__).resolve().parent / "pip-audit-ignore.txt"
PROJECT_JSON = "https://pypi.org/pypi/{name}/json"
SKIPPED_NAME = re.compile(r":\s*(?P<name>[A-Za-z0-9._-]+) \((?P<version>[^)]+)\)\s*$")

Fetch = Callable[[str], dict[str, Any] | None]


def ignored_ids(path: Path = IGNORE_FILE) -> list[str]:
    """Advisory ids from the ignore file: ``<id>  # <package> — reason``; a line without a reason is an error."""
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        entry, _, reason = line.partition("#")
        if not entry.strip():
            continue
        if not reason.strip():
            raise SystemExit(f"{path}:{number}: ignoring {entry.strip()} needs a reason after '#'")
        ids.append(entry.split()[0])
    return ids


def fetch_project(name: str) -> dict[str, Any] | None:
    """PyPI's project JSON (latest release), or None when it cannot be had."""
    try:
        with urllib.request.urlopen(PROJECT_JSON.format(name=name), timeout=15) as response:  # noqa: S310 - fixed https URL
            data: dict[str, Any] = json.load(response)
            return data
    except (OSError, ValueError):
        return None


def _audit_from_latest(dep: dict[str, Any], project: dict[str, Any] | None, ignored: set[str]) -> dict[str, Any]:
    match = SKIPPED_NAME.search(str(dep.get("skip_reason", "")))
    if match is None or project is None:
        return dep
    name, installed = match["name"], match["version"]
    latest = str(project.get("info", {}).get("version", ""))
    if latest != installed:
        reason = f"{name} {installed} is not PyPI's latest ({latest or '?'}): its advisories are unknown here"
        return {"name": name, "version": installed, "skip_reason": reason}
    vulns = [
        {"id": v.get("id"), "fix_versions": v.get("fixed_in", [])}
        for v in project.get("vulnerabilities", [])
        if not v.get("withdrawn") and not ({v.get("id"), *v.get("aliases", [])} & ignored)
    ]
    return {"name": name, "version": installed, "vulns": vulns, "source": "pypi-project-json"}


def complete_with_project_json(
    report: dict[str, Any], ignored: list[str], fetch: Fetch = fetch_project
) -> dict[str, Any]:
    """Audit the packages pip-audit skipped from PyPI's project JSON where the installed release is the latest."""
    deps = [d for d in report.get("dependencies", []) if isinstance(d, dict)]
    skipped = [d for d in deps if d.get("skip_reason")]
    names = [m["name"] if (m := SKIPPED_NAME.search(str(d["skip_reason"]))) else "" for d in skipped]
    with ThreadPoolExecutor(max_workers=16) as pool:
        projects = list(pool.map(lambda n: fetch(n) if n else None, names))
    completed = {id(d): _audit_from_latest(d, p, set(ignored)) for d, p in zip(skipped, projects, strict=True)}
    return {**report, "dependencies": [completed.get(id(d), d) for d in deps]}


def _editable(dep: dict[str, Any]) -> bool:
    return "editable" in str(dep.get("skip_reason", ""))


def judge(report: dict[str, Any], require_audit: bool) -> tuple[int, list[str]]:
    # the project itself (installed editable) is not a dependency to audit
    deps = [d for d in report.get("dependencies", []) if isinstance(d, dict) and not _editable(d)]
    skipped = [d for d in deps if d.get("skip_reason")]
    vulnerable = [f"{d['name']} {d['version']}: {', '.join(v['id'] for v in d['vulns'])}"
                  for d in deps if d.get("vulns")]
    lines = [f"pip-audit: {len(deps) - len(skipped)} of {len(deps)} packages audited, "
             f"{len(vulnerable)} with known vulnerabilities"]
    lines += [f"  VULNERABLE {line}" for line in vulnerable]
    from_latest = sum(1 for d in deps if d.get("source") == "pypi-project-json")
    if from_latest:
        lines.append(f"  {from_latest} of them from PyPI's project JSON (installed release == latest)")
    if skipped:
        names = ", ".join(f"{d.get('name')} {d.get('version', '')}".strip() for d in skipped[:12])
        lines.append(f"  NOT AUDITED: {len(skipped)} packages: {names} (e.g. {skipped[0].get('skip_reason')})")
    failed = bool(vulnerable) or (require_audit and bool(skipped))
    return (1 if failed else 0), lines


def main() -> int:
    binary = shutil.which("pip-audit")
    if binary is None:
        sys.stderr.write("pip-audit is not installed (it is in the 'test' extra)\n")
        return 1
    args = [binary, "--skip-editable", "--progress-spinner", "off", "--format", "json"]
    for advisory in ignored_ids():
        args += ["--ignore-vuln", advisory]
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "audit.json"
        subprocess.run([*args, "--output", str(output)], check=False, timeout=600)  # noqa: S603 - fixed argv
        require = os.environ.get("APPLIANCE_REQUIRE_PIP_AUDIT") == "1"
        if not output.exists():
            sys.stderr.write("pip-audit: NOT AUDITED (no report; is the vulnerability service reachable?)\n")
            return 1 if require else 0
        report = complete_with_project_json(json.loads(output.read_text()), ignored_ids())
    code, lines = judge(report, require)
    for line in lines:
        sys.stderr.write(line + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
