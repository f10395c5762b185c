"""Fail the build on code that must never cross a trust boundary.

eval/exec, pickle/marshal/shelve/dill loads, yaml.load (and unsafe_load/full_load),
subprocess with shell=True, os.system/os.popen, unsandboxed Jinja (jinja2.Environment /
jinja2.Template), torch.load without ``weights_only=True``, numpy.load with
``allow_pickle=True`` and tarfile ``extractall`` without a ``filter=`` (path traversal)
in the packages.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("appliance", "gateway", "balancer", "inference", "rag", "observability")
BANNED_CALLS = {
    "eval", "exec", "pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.load", "marshal.loads",
    "shelve.open", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
    "jinja2.Environment", "jinja2.Template", "Environment", "Template", "os.system", "os.popen",
    # pickle-backed on-disk caches (CVE-2025-69872, no fix released): code runs from whoever can write the cache dir
    "diskcache.Cache", "diskcache.FanoutCache", "diskcache.Index", "LlamaDiskCache", "llama_cpp.LlamaDiskCache",
}
# call → (keyword, value it must have) for calls that are only safe with that keyword set
REQUIRED_KEYWORDS = {"torch.load": ("weights_only", True)}
FORBIDDEN_KEYWORDS = {"load": ("allow_pickle", True)}  # numpy.load / np.load(..., allow_pickle=True)


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
        found.extend(f"{path}:{node.lineno}: {problem}" for problem in _keyword_problems(node, name))
    return found


def _constant(node: ast.Call, arg: str) -> object:
    for keyword in node.keywords:
        if keyword.arg == arg:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "<expr>"
    return None


def _keyword_problems(node: ast.Call, name: str) -> list[str]:
    found = []
    if _constant(node, "shell") is True:
        found.append("shell=True")
    if name in REQUIRED_KEYWORDS:
        arg, value = REQUIRED_KEYWORDS[name]
        if _constant(node, arg) is not value:
            found.append(f"{name} without {arg}={value}")
    last = name.rsplit(".", 1)[-1]
    if last in FORBIDDEN_KEYWORDS:
        arg, value = FORBIDDEN_KEYWORDS[last]
        if _constant(node, arg) is value:
            found.append(f"{name} with {arg}={value}")
    if last == "extractall" and _constant(node, "filter") is None:
        found.append(f"{name} without filter= (archive path traversal)")
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
