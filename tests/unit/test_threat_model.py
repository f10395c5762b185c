"""THREAT_MODEL.md stays true to the code: every test it cites exists, under the name it gives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"`((?:[\w./-]*test_\w+\.py)?(?:::[\w]+(?:\[[^\]`]*\])?)?)`")


def _tests_by_name() -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        found.setdefault(path.name, []).append(path)
    return found


def _citations(page: Path) -> list[tuple[str, str, str | None]]:
    """(row text, file, test function or None) for each citation; ``::name`` refers to the row's last file."""
    cited: list[tuple[str, str, str | None]] = []
    for line in page.read_text().splitlines():
        last: str | None = None
        for ref in CITED.findall(line):
            if not ref or ("::" not in ref and not ref.endswith(".py")):
                continue
            file, _, func = ref.partition("::")
            file = file or (last or "")
            last = file
            cited.append((line[:60], file, re.sub(r"\[.*\]$", "", func) or None))
    return cited


def test_every_test_the_threat_model_cites_exists() -> None:
    cited = _citations(ROOT / "THREAT_MODEL.md")
    assert len(cited) > 40
    missing = _missing(cited)
    assert not missing, "\n".join(missing)


def test_every_test_the_gateway_threat_model_cites_exists() -> None:
    """gateway/THREAT_MODEL.md ties its sign-in claims to tests the same way."""
    cited = _citations(ROOT / "gateway" / "THREAT_MODEL.md")
    assert len(cited) > 20
    missing = _missing(cited)
    assert not missing, "\n".join(missing)


def _missing(cited: list[tuple[str, str, str | None]]) -> list[str]:
    by_name = _tests_by_name()
    missing = []
    for row, file, func in cited:
        paths = [ROOT / file] if "/" in file else by_name.get(file, [])
        paths = [p for p in paths if p.is_file()]
        if not paths:
            missing.append(f"{row!r}: no file {file}")
        elif func and not any(re.search(rf"^(?:async )?def {func}\(", p.read_text(), re.MULTILINE) for p in paths):
            missing.append(f"{row!r}: no test {func} in {file}")
    return missing
