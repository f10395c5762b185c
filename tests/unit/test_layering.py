"""The package layering of docs/ARCHITECTURE.md, checked on the import statements (parsed, not imported).

* no service package imports another service's package (they talk HTTP);
* ``appliance/core`` imports no service;
* the CLI, the runtimes, the backup and the benchmarks reach the RAG service over HTTP or through
  ``appliance.core.rag_wire``, never through ``rag`` internals: the bench's raw references run as
  ``python -m rag.measure`` in a process of their own.

Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "balancer", "inference", "rag", "observability")
# package or sub-package -> the service packages it must not import
RULES: dict[str, frozenset[str]] = {
    **{service: frozenset(SERVICES) - {service} for service in SERVICES},
    "appliance/core": frozenset(SERVICES),
    "appliance/cli": frozenset(SERVICES),
    "appliance/runtime": frozenset(SERVICES),
    "appliance/backup": frozenset(SERVICES),
    # bench gateway times the gateway's Redis hot path in-process against redis-py; nothing else crosses
    "appliance/bench": frozenset(SERVICES) - {"gateway"},
}


def imported_packages(source: str, filename: str = "<source>") -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in ``source``, nested ones included."""
    found = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def violations(package: str, banned: frozenset[str], root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted((root / package).rglob("*.py")):
        for name, line in sorted(imported_packages(path.read_text(encoding="utf-8"), str(path))):
            if name in banned:
                out.append(f"{path.relative_to(root)}:{line} imports {name}")
    return out


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_no_forbidden_service(package: str) -> None:
    assert (ROOT / package).is_dir(), f"{package} moved: update RULES"
    assert violations(package, RULES[package]) == []


def test_every_import_form_is_seen() -> None:
    source = (
        "import rag\nimport rag.index as idx\nfrom rag.store import DocumentStore\n"
        "def f():\n    from rag import measure\n    import gateway.app\n"
        "from . import sibling\nfrom appliance.core.rag_wire import SearchQuery\nimport ragtime\n"
    )
    names = [name for name, _line in sorted(imported_packages(source), key=lambda item: item[1])]
    assert names == ["rag", "rag", "rag", "rag", "gateway", "appliance", "ragtime"]


def test_a_bench_importing_rag_internals_is_caught(tmp_path: Path) -> None:
    bench = tmp_path / "appliance" / "bench"
    bench.mkdir(parents=True)
    (bench / "ok.py").write_text("from appliance.core.rag_wire import SearchQuery\nimport httpx\n")
    (bench / "bad.py").write_text("def load():\n    from rag.index import recall_at_k\n    return recall_at_k\n")
    assert violations("appliance/bench", RULES["appliance/bench"], tmp_path) == ["appliance/bench/bad.py:2 imports rag"]
