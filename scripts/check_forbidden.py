"""Fail the build on code that must never cross a trust boundary.

eval/exec, pickle/marshal loads, yaml.load, subprocess with shell=True and
unsandboxed Jinja (jinja2.Environment / jinja2.Template) in the packages.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("appliance", "gateway", "balancer", "inference", "rag", "observability")
BANNED_CALLS = {
    "eval", "exec", "pickle.load", "pickle.loads", "marshal.loads", "yaml.load",
    "jinja2.Environment", "jinja2.Template", "Environment", "Template", "os.system",
}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    jinja_names = {
        alias.asname or alias.name
        for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "jinja2"
        for alias in node.names if alias.name in {"Environment", "Template"}
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        bare_jinja = name in {"Environment", "Template"} and name not in jinja_names
        if name in BANNED_CALLS and not bare_jinja:
            found.append(f"{path}:{node.lineno}: call to {name}")
        for keyword in node.keywords:
            if keyword.arg == "shell" and isinstance(keyword.value, ast.Constant) and keyword.value.value is True:
                found.append(f"{path}:{node.lineno}: shell=True")
    return found


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    files = [f for pkg in PACKAGES if (root / pkg).is_dir() for f in sorted((root / pkg).rglob("*.py"))]
    found = [line for f in files for line in problems(f)]
    for line in found:
        sys.stderr.write(line + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
