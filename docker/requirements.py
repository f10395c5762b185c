"""Print the pyproject dependencies one image needs, so the Dockerfiles never drift from pyproject.toml.

    python docker/requirements.py --exclude torch faiss-cpu --extra gpu > requirements.txt
    python docker/requirements.py --only pydantic aiohttp > requirements.txt
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
    args = parser.parse_args()
    sys.stdout.write("\n".join(select(set(args.exclude), set(args.only), args.extra)) + "\n")


if __name__ == "__main__":
    main()
