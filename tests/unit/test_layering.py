"""The package layering of docs/ARCHITECTURE.md, checked on the import statements (parsed, not imported).

* no service package imports another service's package (they talk HTTP);
* ``appliance/core`` imports no service;
* the CLI, the runtimes, the backup and the benchmarks reach the RAG service over HTTP or through
  ``appliance.core.rag_wire``, never through ``rag`` internals;
* a benchmark touches a service's internals only from a process of its own: a private module of
  ``appliance/bench`` (``_name``, run as ``python -m appliance.bench._name``) that no other module imports;
* product packages (the services, ``appliance/core``, the CLI, the runtimes, the backup) import no benchmark
  and no test code;
* no test module imports another: what tests share lives in ``tests/support/``, and ``tests/`` outside it
  holds test modules, ``conftest.py`` and ``__init__.py`` only.

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
}
PRODUCT = (*SERVICES, "appliance/core", "appliance/cli", "appliance/runtime", "appliance/backup")
NOT_PRODUCT = ("appliance.bench", "tests")  # module prefixes a product package must not import


def imported_modules(source: str, filename: str = "<source>") -> set[tuple[str, int]]:
    """(dotted module, line) of every absolute import in ``source``, nested ones included; ``from a.b import c``
    counts as ``a.b`` and ``a.b.c`` (``c`` may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found |= {(alias.name, node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module, node.lineno))
            found |= {(f"{node.module}.{alias.name}", node.lineno) for alias in node.names}
    return found


def imported_packages(source: str, filename: str = "<source>") -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in ``source``, nested ones included."""
    return {(name.split(".")[0], line) for name, line in imported_modules(source, filename)}


def _per_statement(found: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """One (name, line) per import statement: the shortest name it imports (the module of a ``from`` import)."""
    shortest: dict[int, str] = {}
    for name, line in found:
        if line not in shortest or len(name) < len(shortest[line]):
            shortest[line] = name
    return sorted(((name, line) for line, name in shortest.items()), key=lambda item: item[1])


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _python_files(root: Path, *folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (root / folder).rglob("*.py"))


def violations(package: str, banned: frozenset[str], root: Path = ROOT) -> list[str]:
    out = []
    for path in _python_files(root, package):
        for name, line in sorted(imported_packages(path.read_text(encoding="utf-8"), str(path))):
            if name in banned:
                out.append(f"{path.relative_to(root)}:{line} imports {name}")
    return out


def _source_folders(root: Path) -> list[str]:
    skip = ("data", "artifacts", "node_modules")
    return [p.name for p in root.iterdir() if p.is_dir() and p.name[0] not in "._" and p.name not in skip
            and not p.name.endswith(".egg-info")]


def bench_process_modules(root: Path = ROOT) -> set[str]:
    """The private modules of ``appliance/bench`` that no other module of the tree imports: each runs as a
    process of its own (``python -m appliance.bench._name``)."""
    private = {f"appliance.bench.{path.stem}" for path in (root / "appliance" / "bench").glob("_*.py")}
    private.discard("appliance.bench.__init__")
    private.discard("appliance.bench.__main__")
    for path in _python_files(root, *_source_folders(root)):
        own = ".".join(path.relative_to(root).with_suffix("").parts)
        for name, _line in imported_modules(path.read_text(encoding="utf-8"), str(path)):
            private -= {module for module in private if module != own and _within(name, module)}
    return private


def bench_violations(root: Path = ROOT) -> list[str]:
    """Service packages imported by a benchmark module other than a process of its own."""
    allowed = bench_process_modules(root)
    out = []
    for path in _python_files(root, "appliance/bench"):
        if ".".join(path.relative_to(root).with_suffix("").parts) in allowed:
            continue
        for name, line in sorted(imported_packages(path.read_text(encoding="utf-8"), str(path))):
            if name in SERVICES:
                out.append(f"{path.relative_to(root)}:{line} imports {name}")
    return out


def product_violations(root: Path = ROOT) -> list[str]:
    """Benchmark or test code imported by a product package."""
    out = []
    for path in _python_files(root, *PRODUCT):
        found = imported_modules(path.read_text(encoding="utf-8"), str(path))
        bad = {(name, line) for name, line in found if any(_within(name, prefix) for prefix in NOT_PRODUCT)}
        out += [f"{path.relative_to(root)}:{line} imports {name}" for name, line in _per_statement(bad)]
    return out


def test_module_violations(root: Path = ROOT) -> list[str]:
    """A test module (conftest included) imported by anything, and helper modules outside ``tests/support``."""
    out = []
    for path in _python_files(root, "tests"):
        relative = path.relative_to(root)
        if relative.parts[1] != "support" and not (
            path.name.startswith("test_") or path.name in ("conftest.py", "__init__.py")
        ):
            out.append(f"{relative}: a helper, not a test: it belongs in tests/support/")
        found = imported_modules(path.read_text(encoding="utf-8"), str(path))
        bad = {(name, line) for name, line in found
               if _within(name, "tests") and name != "tests" and not _within(name, "tests.support")}
        out += [f"{relative}:{line} imports {name}" for name, line in _per_statement(bad)]
    return out


test_module_violations.__test__ = False  # type: ignore[attr-defined]  # a helper whose name starts with test_


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_no_forbidden_service(package: str) -> None:
    assert (ROOT / package).is_dir(), f"{package} moved: update RULES"
    assert violations(package, RULES[package]) == []


def test_benchmarks_touch_service_internals_only_in_processes_of_their_own() -> None:
    assert bench_violations() == []


def test_product_packages_import_no_bench_or_test_code() -> None:
    assert [package for package in PRODUCT if not (ROOT / package).is_dir()] == []
    assert product_violations() == []


def test_no_test_module_imports_another() -> None:
    assert test_module_violations() == []


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
    assert bench_violations(tmp_path) == ["appliance/bench/bad.py:2 imports rag"]


def test_a_bench_process_module_may_import_a_service_until_something_imports_it(tmp_path: Path) -> None:
    bench = tmp_path / "appliance" / "bench"
    bench.mkdir(parents=True)
    (bench / "_reference.py").write_text("from rag.index import recall_at_k\n")
    (bench / "rag.py").write_text("import subprocess\nARGV = ['python', '-m', 'appliance.bench._reference']\n")
    assert bench_violations(tmp_path) == []
    (bench / "rag.py").write_text("from appliance.bench._reference import recall_at_k\n")
    assert bench_violations(tmp_path) == ["appliance/bench/_reference.py:1 imports rag"]


def test_test_code_in_a_product_package_is_caught(tmp_path: Path) -> None:
    for package in PRODUCT:
        (tmp_path / package).mkdir(parents=True)
    (tmp_path / "gateway" / "fakes.py").write_text("from tests.support.stack import appliance_stack\n")
    (tmp_path / "appliance" / "cli" / "bench.py").write_text("def run():\n    import appliance.bench.harness\n")
    (tmp_path / "appliance" / "core" / "ok.py").write_text("import appliance.benchmarks\nimport testsuite\n")
    assert product_violations(tmp_path) == [
        "appliance/cli/bench.py:2 imports appliance.bench.harness",
        "gateway/fakes.py:1 imports tests.support.stack",
    ]


def test_a_test_module_importing_another_is_caught(tmp_path: Path) -> None:
    for folder in ("tests/support", "tests/e2e", "tests/browser"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "tests/support/stack.py").write_text("import json\n")
    (tmp_path / "tests/e2e/test_a.py").write_text("from tests.support.stack import X\nfrom tests.e2e import test_b\n")
    (tmp_path / "tests/browser/conftest.py").write_text("import tests.conftest as root\n")
    (tmp_path / "tests/browser/helpers.py").write_text("import json\n")
    assert test_module_violations(tmp_path) == [
        "tests/browser/conftest.py:1 imports tests.conftest",
        "tests/browser/helpers.py: a helper, not a test: it belongs in tests/support/",
        "tests/e2e/test_a.py:2 imports tests.e2e",
    ]
